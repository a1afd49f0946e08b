"""Running on Ray: the session (local on 127.0.0.1, or joined), the learner actor, a sweep's cells.

    stalerl train --runtime ray --num-workers 2                 # a local Ray, bound to localhost
    stalerl train --runtime ray --ray-address auto              # join a running cluster

The learner is an actor: ``train(config)``, unchanged, runs inside it; with ``runtime.runtime: ray``
it takes its rollouts from ``RayRollouts`` (ray_rollouts.py) instead of the local thread. An actor,
not the driver, so that on a cluster the learner gets the resources it asks for (a GPU node) and
the driver can stay on a head node. GPUs are asked for by runtime.learner_gpus and
runtime.worker_gpus; an actor that asks for none is placed anywhere and uses the first GPU it sees.
The learner writes the run directory on the node it runs on (use a shared filesystem for ``--out``
on a multi-node cluster). Checkpoints are written as in the local runtime
(``RayRollouts.snapshot``), and ``--resume`` goes on from them on Ray. A learner failure ends the
run: its actor's error is raised here with the newest checkpoint and the ``--resume`` command that
continues from it, and the rollout actors it owns die with it. A sweep on Ray runs each cell in a
learner actor of its own (run_configs_on_ray), so that a Ctrl-C or SIGTERM reaches its cells as it
reaches the learner of ``stalerl train --runtime ray``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from stalerl.config import ConfigError, TrainConfig, first_line, validate
from stalerl.guards import Interrupted, RunStopped, StopRequests, resume_hint

if TYPE_CHECKING:  # the sweep imports this module only for --runtime ray
    from stalerl.lab.sweep import SweepStop


def local_init_kwargs(num_cpus: float, num_gpus: int | None = None) -> dict[str, Any]:
    """ray.init arguments for a private, single-machine Ray: no dashboard, sized to the actors asked for.

    CPUs are logical (at least the machine's count, so fractions of a core fit); GPUs are the ones Ray
    finds unless `num_gpus` says otherwise (a test gives a CPU machine GPUs to schedule with)."""
    kwargs = {"include_dashboard": False, "num_cpus": max(os.cpu_count() or 1, int(num_cpus + 0.999)),
              "log_to_driver": True}
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    return kwargs


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuses, in one line and before anything starts, an address Ray could not join: a malformed
    one, or a HOST:PORT where nothing answers (ray.init would retry for minutes there)."""
    if address in ("", "auto", "local"):  # "auto" is checked by ray.init itself, at once (ray_session)
        return
    target = address.removeprefix("ray://")
    host, colon, port = target.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not colon or not host or "/" in target or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address: {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        why = error.strerror or type(error).__name__
        raise ConfigError(f"--ray-address: nothing answers at {host}:{port} ({why}); is the Ray cluster up?") from None


@contextlib.contextmanager
def ray_session(address: str = "", num_cpus: float = 1.0, num_gpus: int | None = None) -> Iterator[None]:
    """Joins `address`, or starts a local Ray bound to 127.0.0.1 and shuts it down on exit.

    A Ray already initialised in this process (a test's fixture, an enclosing session) is used
    as it is and left running. `num_gpus`: see local_init_kwargs.
    """
    import ray
    import ray._private.ray_constants as ray_constants

    if ray.is_initialized():
        yield
        return
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as error:  # "auto" with no cluster running, say
            raise ConfigError(f"--ray-address {address}: {first_line(error)}") from None
    else:
        # Ray binds its servers to the node IP (all interfaces, in 2.60); with "clusters" disabled it
        # takes the loopback address as the node IP and binds there, so nothing is reachable from
        # outside. The raylet and workers inherit the setting through the environment.
        previous = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        enabled, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(**local_init_kwargs(num_cpus, num_gpus))
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = enabled
            if previous is None:
                os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
            else:
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = previous
    try:
        yield
    finally:
        ray.shutdown()


def _check_resources(config: TrainConfig) -> None:
    """Fails fast instead of leaving actors pending forever on a cluster too small for them."""
    import ray

    runtime = config.runtime
    cluster = ray.cluster_resources()
    needed = runtime.learner_cpus + runtime.num_workers * runtime.worker_cpus
    available = cluster.get("CPU", 0.0)
    if needed > available:
        raise ConfigError(f"runtime.num_workers: {runtime.num_workers} workers x {runtime.worker_cpus} CPU + "
                          f"learner {runtime.learner_cpus} CPU need {needed:g} CPUs; the cluster has {available:g}")
    needed = runtime.learner_gpus + runtime.num_workers * runtime.worker_gpus
    available = cluster.get("GPU", 0.0)
    if needed > available:
        raise ConfigError(f"runtime.worker_gpus: {runtime.num_workers} workers x {runtime.worker_gpus:g} GPU + "
                          f"learner {runtime.learner_gpus:g} GPU need {needed:g} GPUs; the cluster has {available:g}")


class LearnerFailed(RuntimeError):
    """The learner actor died or its train() raised; the message names the checkpoint to resume from."""


class LearnerActor:
    """The learner: the local runtime's loop, `train(config, resume)`, in its own process. It runs with
    two threads (max_concurrency=2, start_learner), so that `request_stop` reaches a running `train`."""

    def ready(self) -> None:
        """Answers once Ray has placed and started the actor: a sweep gives it its cell only then, so
        that a cell still waiting for room is never started after a stop (run_configs_on_ray)."""

    def train(self, config: TrainConfig, resume: bool = False) -> dict[str, Any]:
        # The rollout actors start first, so that their start-up (importing torch and transformers,
        # building the policy: 7 s and more) runs beside the learner's instead of after it. A warm
        # start still to be made is made once: the others wait for it (warmstart.py).
        started = None
        if config.runtime.runtime == "ray":
            from stalerl.ray_rollouts import start_rollout_actors

            started = start_rollout_actors(validate(config))  # the config train() runs
        try:
            from stalerl.train import train

            return train(config, resume=resume, started_actors=started)
        finally:
            if started is not None:  # a run refused before its rollouts began would leave them running
                started.kill()

    def request_stop(self, signal_name: str) -> None:
        """The driver's Ctrl-C or SIGTERM: train stops after its step with a checkpoint, as a local run does."""
        from stalerl.guards import request_stop

        request_stop(signal_name)


def start_learner(num_cpus: float, num_gpus: float, name: str | None = None) -> Any:
    """A LearnerActor asking for these resources; never restarted (a restart would begin its run again)."""
    import ray

    return ray.remote(LearnerActor).options(name=name, num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                            max_concurrency=2).remote()


def _learner_failed(what: str, why: str, config: TrainConfig,
                    kind: type[RuntimeError] = LearnerFailed) -> RuntimeError:
    """One line: what happened, the newest checkpoint the learner left and the command that goes on from it."""
    from stalerl.checkpoint import newest_usable  # torch: only once the learner has failed

    run_dir = Path(config.out)  # on a cluster: readable here only on a shared filesystem
    why = " ".join(why.split()).rstrip(".")  # Ray's messages span several lines
    return kind(f"{what}: {why}; {resume_hint(run_dir, newest_usable(run_dir))}")


def train_on_ray(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Runs `config` (runtime.runtime == "ray") with a learner actor and N rollout actors.

    `resume`: go on with the unfinished run in config.out from its newest valid checkpoint.
    """
    import ray

    config = validate(config)
    runtime = config.runtime
    with ray_session(runtime.ray_address, runtime.learner_cpus + runtime.num_workers * runtime.worker_cpus):
        _check_resources(config)
        learner = start_learner(runtime.learner_cpus, runtime.learner_gpus, f"stalerl-learner-{uuid.uuid4().hex[:8]}")
        stop = StopRequests().install()  # over Ray's own SIGTERM handler, which dumps a stack and exits 1
        try:
            return _wait_for(learner, learner.train.remote(config, resume), stop)
        except KeyboardInterrupt:  # a second signal: the learner is killed below, mid-step
            raise _learner_failed("interrupted at once", "the step in progress is lost", config,
                                  Interrupted) from None
        except ray.exceptions.RayTaskError as error:  # train raised
            if isinstance(error.cause, ConfigError):  # bad input stays a one-line error
                raise ConfigError(str(error.cause)) from None
            if isinstance(error.cause, RunStopped):  # a stop on purpose: its message says how to resume
                raise error.cause from None
            raise _learner_failed("learner failed", repr(error.cause), config) from error
        except ray.exceptions.RayActorError as error:  # the learner's process died
            raise _learner_failed("learner died", str(error), config) from error
        finally:
            stop.uninstall()
            ray.kill(learner)


def _wait_for(learner: Any, run: Any, stop: StopRequests) -> dict[str, Any]:
    """The learner's summary; a Ctrl-C or SIGTERM meanwhile is passed on to it (it stops after its step
    with a checkpoint and raises Interrupted), and a second one raises KeyboardInterrupt here."""
    import ray

    forwarded = False
    while not ray.wait([run], timeout=0.2)[0]:  # wakes to run the signal handlers
        if stop.requested and not forwarded:
            learner.request_stop.remote(stop.requested)
            forwarded = True
    return ray.get(run)


NOT_STARTED = "not started: the sweep was stopping"


def run_configs_on_ray(configs: list[TrainConfig], cpus_per_run: float, address: str | None = None,
                       resume: list[bool] | None = None, stop: SweepStop | None = None) -> list[dict[str, Any]]:
    """Runs `train(config, resume)` for each config in a learner actor of its own, asking for
    `cpus_per_run` CPUs and runtime.learner_gpus GPUs; Ray starts each one as room frees up. A process
    per cell also means that a cell with vLLM, which cannot be torn down in process (vllm#21073),
    leaves nothing behind for the next cell.

    Returns the summaries in the order of `configs`; a run that raised gives ``{"out", "error"}``.
    `stop` (the sweep's Ctrl-C and SIGTERM, installed here over Ray's own handler): on the first
    signal each running cell stops after its step with a checkpoint and gives ``{"out", "interrupted":
    its message}``, and a cell not yet started gives ``{"out", "interrupted": NOT_STARTED}``; on a second
    the running cells are killed at once ("interrupted", since a summary has a "stopped" of its own).
    Without `address`, a local Ray on 127.0.0.1 sized for the runs is started and shut down.
    A config with ``runtime.runtime: ray`` starts its own rollout actors from inside its actor; their
    CPUs come on top of `cpus_per_run`, so a cluster must have room for both.
    """
    import ray

    if cpus_per_run <= 0:
        raise ConfigError("cpus_per_run: must be > 0")
    configs = [validate(config) for config in configs]
    resume = resume or [False] * len(configs)
    with ray_session(address or "", num_cpus=cpus_per_run), stop.installed() if stop else contextlib.nullcontext():
        gpus = max((config.runtime.learner_gpus for config in configs), default=0)
        available = ray.cluster_resources().get("GPU", 0.0)
        if gpus > available:  # its actor would wait forever
            raise ConfigError(f"runtime.learner_gpus: a sweep cell asks for {gpus:g} GPUs; "
                              f"the cluster has {available:g}")
        actors = [start_learner(cpus_per_run, config.runtime.learner_gpus) for config in configs]
        try:
            return _run_cells(actors, configs, resume, stop)
        finally:
            for actor in actors:
                ray.kill(actor)


def _run_cells(actors: list[Any], configs: list[TrainConfig], resume: list[bool],
               stop: SweepStop | None) -> list[dict[str, Any]]:
    """run_configs_on_ray's loop: each actor gets its cell once Ray has started it, and is killed once
    its cell ends, which frees its resources for a waiting one. A stop is passed on as train_on_ray
    passes it on (_wait_for)."""
    import ray

    results: list[dict[str, Any]] = [{} for _ in configs]
    starting = {actor.ready.remote(): index for index, actor in enumerate(actors)}
    running: dict[Any, int] = {}
    forwarded = False
    while starting or running:
        for ref in ray.wait([*starting, *running], num_returns=1, timeout=0.2)[0]:  # wakes to run the signal handlers
            if ref in starting:
                index = starting.pop(ref)
                if stop is not None and stop.requested:  # started just now: never begins its cell
                    ray.kill(actors[index])
                    results[index] = {"out": configs[index].out, "interrupted": NOT_STARTED}
                else:
                    running[actors[index].train.remote(configs[index], resume[index])] = index
            else:
                index = running.pop(ref)
                results[index] = _cell_result(ref, configs[index])
                ray.kill(actors[index])
        if stop is not None and stop.requested and not forwarded:
            for index in starting.values():  # still waiting for room (ray.kill cancels that)
                ray.kill(actors[index])
                results[index] = {"out": configs[index].out, "interrupted": NOT_STARTED}
            starting.clear()
            for index in running.values():
                actors[index].request_stop.remote(stop.requested)
            forwarded = True
        if stop is not None and stop.again:  # a second signal: their steps in progress are lost
            for index in running.values():
                ray.kill(actors[index])
                results[index] = {"out": configs[index].out, "interrupted": _at_once(configs[index])}
            running.clear()
    return results


def _cell_result(ref: Any, config: TrainConfig) -> dict[str, Any]:
    """A finished cell's summary, or what stopped it: one failed cell must not sink the sweep."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, Interrupted):  # the stop passed on: its message says where it stopped
            return {"out": config.out, "interrupted": str(error.cause)}
        return {"out": config.out, "error": f"{type(error.cause).__name__}: {error.cause}"}
    except ray.exceptions.RayActorError as error:  # its process died
        return {"out": config.out, "error": f"its actor died: {first_line(error)}"}


def _at_once(config: TrainConfig) -> str:
    from stalerl.checkpoint import newest_usable

    run_dir = Path(config.out)
    return f"interrupted at once; {resume_hint(run_dir, newest_usable(run_dir))}"
