"""The Ray runtime: the local runtime's staleness contract across N rollout actors, faults survived,
and checkpoints: a killed learner leaves one, and --resume goes on from it.

One private Ray (127.0.0.1, no dashboard) for the module; actors ask for a fraction of a CPU so
that 2 workers and a learner fit CI's 2 cores. The Ray is told it has 2 GPUs, so that placing actors
and tasks on GPUs is tested on CPU machines too (nothing here runs CUDA).
"""

import dataclasses
import functools
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from stalerl.checkpoint import list_checkpoints  # noqa: E402
from stalerl.config import ConfigError, RuntimeConfig, StalenessConfig, TrainConfig, validate  # noqa: E402
from stalerl.metrics import read_metrics  # noqa: E402
from stalerl.ray_rollouts import RayRollouts  # noqa: E402
from stalerl.ray_runtime import (NOT_STARTED, check_ray_address, local_init_kwargs, ray_session,  # noqa: E402
                                 run_configs_on_ray, train_on_ray)
from stalerl.staleness import PipelineState, RolloutWorkerError, check_lag  # noqa: E402
from stalerl.train import train  # noqa: E402

# The stub workers below run inside actors; ship them by value (tests/ is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SAMPLES_PER_BATCH = 8  # 2 prompts x 4 samples
FAKE_GPUS = 2  # the module's Ray schedules on these; no CUDA behind them


@pytest.fixture(scope="module")
def local_ray(warm_start_cache):
    with ray_session(num_cpus=2, num_gpus=FAKE_GPUS):  # after the cache fixture: actors inherit STALERL_CACHE
        yield
    assert not ray.is_initialized()


def ray_config(tmp_path: Path, name: str, mode: str, staleness: int, steps: int, num_workers: int = 2,
               **runtime) -> TrainConfig:
    """Each actor is a fresh interpreter that imports torch and transformers (~7 s of CPU on CI's 2
    cores): tests whose subject is not the number of rollout actors ask for one."""
    config = TrainConfig(steps=steps, val_every=10**6, progress=False, tensorboard=False, threads=1,
                         out=str(tmp_path / name), staleness=StalenessConfig(mode=mode, staleness=staleness),
                         runtime=RuntimeConfig(runtime="ray", num_workers=num_workers, worker_cpus=0.5,
                                               learner_cpus=0.5, **runtime))
    return dataclasses.replace(
        config, rollout=dataclasses.replace(config.rollout, prompts_per_step=2, group_size=4),
        task=dataclasses.replace(config.task, val_size=32),
    )


def rollout_actors_left(earlier: set[str] = frozenset(), within_s: float = 30.0) -> list[str]:
    """Rollout actors not in `earlier` still alive after waiting up to `within_s` (a kill lands asynchronously)."""
    deadline = time.time() + within_s
    while True:
        left = [n for n in ray.util.list_named_actors() if n.startswith("stalerl-rollout-") and n not in earlier]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def consumed(run_dir: Path) -> tuple[list[int], list[int]]:
    """(lag of every consumed sample, every consumed sample id) from samples.jsonl."""
    lags, ids = [], []
    for row in read_lines(run_dir / "samples.jsonl"):
        lags.extend(row["step"] - version for version in row["versions"])
        ids.extend(row["sample_ids"])
    return lags, ids


# ---------------------------------------------------------------- the session


def test_a_ray_init_error_is_one_line(monkeypatch):
    """What ray.init raises for "auto" with no cluster running (seen with Ray 2.60), as one line."""
    if ray.is_initialized():  # run before the module's Ray, which ray_session would use as it is
        pytest.skip("a Ray is running in this process")

    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to "
                              "by setting `--address` flag or `RAY_ADDRESS` environment variable.\nmore")

    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ConfigError, match=r"^--ray-address auto: Could not find any running Ray instance\. "
                                          r"Please specify .* environment variable\.$"):
        with ray_session("auto"):
            pass


def test_local_ray_is_bound_to_localhost_without_dashboard(local_ray):
    kwargs = local_init_kwargs(num_cpus=1)
    assert kwargs["include_dashboard"] is False
    assert "dashboard_host" not in kwargs and "address" not in kwargs
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    psutil = pytest.importorskip("psutil")
    ours = {process.pid for process in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
    listening = [conn.laddr.ip for conn in psutil.net_connections("tcp")
                 if conn.status == psutil.CONN_LISTEN and conn.pid in ours]
    assert listening  # the check below saw Ray's servers
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in listening), listening


def test_runtime_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="runtime.num_workers"):
        validate(TrainConfig(runtime=RuntimeConfig(runtime="ray", num_workers=0)))
    with pytest.raises(ConfigError, match="runtime.worker_timeout_s"):
        validate(TrainConfig(runtime=RuntimeConfig(runtime="ray", worker_timeout_s=0)))


@pytest.mark.parametrize("runtime, rollout, message", [
    ({"worker_gpus": -0.5}, {}, "runtime.worker_gpus: must be >= 0: a fraction of one GPU, or whole GPUs"),
    ({"learner_gpus": 1.5}, {}, "runtime.learner_gpus: must be >= 0: a fraction of one GPU, or whole GPUs"),
    ({}, {"engine": "vllm"}, r"runtime.worker_gpus: rollout.engine=vllm on Ray needs a GPU share per rollout actor"),
    ({"worker_gpus": 0.5}, {"engine": "vllm", "vllm_gpu_memory_utilization": 0.5},
     r"runtime.worker_gpus: 0.5 of a GPU lets Ray put other actors on it, .* make that < 0.5"),
])
def test_gpu_requests_are_checked_before_any_work(runtime, rollout, message):
    config = TrainConfig(runtime=RuntimeConfig(runtime="ray", **runtime), model=dataclasses.replace(
        TrainConfig().model, name_or_path="some/checkpoint"))
    with pytest.raises(ConfigError, match=message):
        validate(dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, **rollout)))


def test_gpu_requests_that_fit_are_valid():
    validate(TrainConfig(runtime=RuntimeConfig(runtime="ray", worker_gpus=2, learner_gpus=0.25)))
    config = TrainConfig(runtime=RuntimeConfig(runtime="ray", worker_gpus=0.5),
                         model=dataclasses.replace(TrainConfig().model, name_or_path="some/checkpoint"))
    validate(dataclasses.replace(config, rollout=dataclasses.replace(
        config.rollout, engine="vllm", vllm_gpu_memory_utilization=0.4)))
    local = dataclasses.replace(config, runtime=RuntimeConfig(), rollout=dataclasses.replace(config.rollout,
                                                                                              engine="vllm"))
    validate(local)  # the local runtime asks Ray for nothing


def test_missing_ray_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match="runtime.runtime: ray is not installed"):
        validate(TrainConfig(runtime=RuntimeConfig(runtime="ray")))


@pytest.mark.parametrize("address, message", [
    ("garbage", "--ray-address: 'garbage' is not auto, HOST:PORT or ray://HOST:PORT"),
    ("127.0.0.1:notaport", "is not auto, HOST:PORT"),
    ("127.0.0.1:1", r"--ray-address: nothing answers at 127.0.0.1:1 \(Connection refused\); is the Ray cluster up\?"),
    ("ray://127.0.0.1:1", "nothing answers at 127.0.0.1:1"),
])
def test_an_address_ray_cannot_join_is_one_line_before_anything_starts(address, message):
    """ray.init raised a traceback for a malformed address and retried for minutes where nothing listens."""
    with pytest.raises(ConfigError, match=message):
        check_ray_address(address)
    check_ray_address("auto")  # ray.init checks that one at once (below)


# ---------------------------------------------------------------- training on Ray


@pytest.mark.parametrize("mode", ["bounded"])  # exact mode: the local runtime's batches, bit for bit (below)
def test_training_on_ray_keeps_the_staleness_contract_over_1000_samples(local_ray, tmp_path, mode):
    staleness, steps = 2, 64  # 64 x 16 = 1024 consumed samples
    config = ray_config(tmp_path, mode, mode, staleness, steps)
    summary = train(dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, prompts_per_step=4)))
    lags, ids = consumed(tmp_path / mode)
    assert len(lags) >= 1000
    assert len(ids) == len(set(ids)) == steps * 16  # paced, none discarded or repeated
    assert 0 <= min(lags) and max(lags) <= staleness
    rows = read_lines(tmp_path / mode / "metrics.jsonl")
    if mode == "exact":
        assert [row["lag_max"] for row in rows] == [min(step, staleness) for step in range(steps)]
    assert {row["worker"] for row in rows} == {0, 1}  # both actors made batches
    report = summary["rollouts"]
    assert report["runtime"] == "ray" and report["lost_batches"] == 0
    assert sum(worker["batches"] for worker in report["workers"]) == steps
    assert all(worker["lag_max"] <= staleness and worker["samples_per_s"] > 0 for worker in report["workers"])


def test_exact_mode_on_ray_makes_the_local_runtimes_batches(local_ray, tmp_path):
    ray_run = ray_config(tmp_path, "ray", "exact", 1, steps=12)
    local_run = dataclasses.replace(ray_run, out=str(tmp_path / "local"),
                                    runtime=dataclasses.replace(ray_run.runtime, runtime="local"))
    train(ray_run)
    train(local_run)
    on_ray, local = read_lines(tmp_path / "ray" / "samples.jsonl"), read_lines(tmp_path / "local" / "samples.jsonl")
    assert on_ray == local  # same prompts, same sampling noise, same weights: same rewards, bit for bit
    assert [row["step"] - row["versions"][0] for row in on_ray] == [min(step, 1) for step in range(12)]  # lag S
    losses = [[row["loss"] for row in read_lines(tmp_path / name / "metrics.jsonl")] for name in ("ray", "local")]
    assert losses[0] == losses[1]


def test_a_killed_rollout_worker_is_replaced_and_its_batch_regenerated(local_ray, tmp_path):
    staleness, steps = 2, 80
    config = ray_config(tmp_path, "fault", "exact", staleness, steps)
    # Long near-uniform samples keep the workers busy, so the kill usually destroys a batch in
    # flight; an actor killed while idle loses the next batch dispatched to it instead.
    config = dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, temperature=5.0,
                                                                     max_new_tokens=40))
    metrics_path = tmp_path / "fault" / "metrics.jsonl"
    killed: list[tuple[str, int]] = []  # (actor, steps logged when the kill landed)
    earlier_actors = set(ray.util.list_named_actors())  # only this run's actors are fair game

    def kill_one_worker_mid_run():
        deadline = time.time() + 120
        while time.time() < deadline:
            # Complete lines only; both actors must be past their constructor, or the kill only
            # restarts a starting actor, which loses no batch (a busy machine starts one late).
            lines = metrics_path.read_text().split("\n")[:-1] if metrics_path.exists() else []
            if len(lines) >= 5 and {json.loads(line)["worker"] for line in lines} == {0, 1}:
                name = next(n for n in ray.util.list_named_actors()
                            if n.startswith("stalerl-rollout-") and n not in earlier_actors)
                ray.kill(ray.get_actor(name), no_restart=True)
                while name in ray.util.list_named_actors() and time.time() < deadline:
                    time.sleep(0.01)  # the kill has landed once the name is freed
                killed.append((name, len(metrics_path.read_text().splitlines())))
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_worker_mid_run)
    killer.start()
    summary = train(config)
    killer.join()
    assert summary["steps"] == steps  # the run finished
    assert killed and killed[0][1] < steps - 10, killed  # the kill landed mid-run
    lags, ids = consumed(tmp_path / "fault")
    assert len(ids) == len(set(ids)) == steps * SAMPLES_PER_BATCH  # none consumed twice, none missing
    assert max(lags) <= staleness
    rows = read_lines(metrics_path)
    assert [row["lag_max"] for row in rows] == [min(step, staleness) for step in range(steps)]  # still exact
    assert summary["rollouts"]["lost_batches"] >= 1, (killed, summary["rollouts"])  # lost work reported
    assert rows[-1]["lost_batches"] >= 1
    assert sum(worker["restarts"] for worker in summary["rollouts"]["workers"]) >= 1


def test_bad_input_in_the_learner_actor_stays_a_config_error(local_ray, tmp_path):
    config = ray_config(tmp_path, "taken", "exact", 1, steps=2, num_workers=1)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("")
    earlier_actors = set(ray.util.list_named_actors())
    with pytest.raises(ConfigError, match="already holds a run"):  # raised in the learner actor
        train_on_ray(config)
    assert rollout_actors_left(earlier_actors) == []  # those it started ahead of its own start-up are gone too


def test_the_learner_and_rollout_actors_hold_the_gpus_they_ask_for(local_ray, tmp_path):
    config = ray_config(tmp_path, "gpus", "exact", 1, steps=6, learner_gpus=1, worker_gpus=0.5)
    fewest_free = [float(FAKE_GPUS)]
    done = threading.Event()

    def watch():
        while not done.is_set() and fewest_free[0] > 0:  # a resource all taken is left out of available_resources
            fewest_free[0] = min(fewest_free[0], ray.available_resources().get("GPU", 0.0))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert train_on_ray(config)["steps"] == 6
    finally:
        done.set()
        watcher.join()
    assert fewest_free[0] == 0  # the learner's 1 GPU and the two actors' 0.5 each, held together


def test_more_gpus_than_the_cluster_has_is_refused_before_any_actor_starts(local_ray, tmp_path):
    config = ray_config(tmp_path, "too-many", "exact", 1, steps=2, learner_gpus=1, worker_gpus=1)
    with pytest.raises(ConfigError, match=r"runtime.worker_gpus: 2 workers x 1 GPU \+ learner 1 GPU need 3 GPUs; "
                                          r"the cluster has 2$"):
        train_on_ray(config)
    assert not (tmp_path / "too-many").exists()


def kill_the_learner_after(run_dir: Path, checkpoint: bool = True) -> threading.Thread:
    """Kills the learner actor once `run_dir` has 5 logged steps (and a checkpoint, if asked)."""
    metrics_path = run_dir / "metrics.jsonl"

    def kill():
        deadline = time.time() + 120
        while time.time() < deadline:
            if ((not checkpoint or list_checkpoints(run_dir)) and metrics_path.exists()
                    and metrics_path.read_bytes().count(b"\n") >= 5):
                name = next(n for n in ray.util.list_named_actors() if n.startswith("stalerl-learner-"))
                ray.kill(ray.get_actor(name), no_restart=True)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill)
    killer.start()
    return killer


def test_a_dead_learner_ends_the_run_with_a_clear_error(local_ray, tmp_path):
    config = ray_config(tmp_path, "learner", "bounded", 1, steps=400, num_workers=1)
    killer = kill_the_learner_after(tmp_path / "learner", checkpoint=False)
    with pytest.raises(RuntimeError, match="learner died"):
        train_on_ray(config)
    killer.join()
    assert rollout_actors_left() == []  # its rollout actors die with it (Ray's ownership)


# ---------------------------------------------------------------- checkpoints and resume on Ray


def checkpointed(tmp_path: Path, name: str, mode: str, steps: int, num_workers: int = 1) -> TrainConfig:
    config = ray_config(tmp_path, name, mode, 2, steps, num_workers)
    return dataclasses.replace(config, seed=5, checkpoint=dataclasses.replace(config.checkpoint, every=2))


def killed_then_resumed(config: TrainConfig) -> None:
    """Runs `config` on Ray, kills its learner mid-run, checks the error's hint and resumes as it says."""
    run_dir = Path(config.out)
    killer = kill_the_learner_after(run_dir)
    with pytest.raises(RuntimeError) as error:
        train_on_ray(config)
    killer.join()
    assert not (run_dir / "summary.json").exists()  # the kill landed mid-run
    newest = list_checkpoints(run_dir)[0]
    message = str(error.value)
    assert message.startswith("learner died: ")
    assert message.endswith(f"checkpoint {newest}; continue with: stalerl train --resume {run_dir}"), message
    assert train_on_ray(config, resume=True)["steps"] == config.steps


def without_ray_fields(rows: list[dict]) -> list[dict]:
    """Metrics rows without timings and the Ray runtime's extras (which actor made a batch varies)."""
    return [{k: v for k, v in row.items() if not k.endswith("_s") and k not in ("worker", "attempts", "lost_batches")}
            for row in rows]


@pytest.fixture(scope="module")
def uninterrupted_exact_run(tmp_path_factory, warm_start_cache) -> Path:
    """checkpointed(exact, 24 steps) run locally to the end: exact mode on Ray makes the local runtime's
    batches, so a run stopped and resumed on Ray must make these rows (checkpoint settings change no step)."""
    config = checkpointed(tmp_path_factory.mktemp("uninterrupted"), "reference", "exact", steps=24)
    train(dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, runtime="local")))
    return Path(config.out)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert without_ray_fields(read_metrics(run_dir)) == without_ray_fields(read_metrics(reference))
    assert (run_dir / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()


def test_exact_mode_on_ray_resumes_a_killed_learner_as_if_never_stopped(local_ray, tmp_path, uninterrupted_exact_run):
    killed_then_resumed(checkpointed(tmp_path, "killed", "exact", steps=24))
    assert_same_run(tmp_path / "killed", uninterrupted_exact_run)


def test_bounded_mode_on_ray_resumes_a_killed_learner_losing_and_repeating_no_sample(local_ray, tmp_path):
    config = checkpointed(tmp_path, "killed", "bounded", steps=24, num_workers=2)  # batches in flight on both
    killed_then_resumed(config)
    samples = read_lines(tmp_path / "killed" / "samples.jsonl")
    assert [row["step"] for row in samples] == list(range(config.steps))
    lags, ids = consumed(tmp_path / "killed")
    assert sorted(ids) == list(range(config.steps * SAMPLES_PER_BATCH))  # each sample exactly once
    assert 0 <= min(lags) and max(lags) <= config.staleness.staleness


def test_sigterm_to_the_driver_stops_the_learner_after_its_step_with_a_checkpoint(local_ray, tmp_path,
                                                                                     uninterrupted_exact_run):
    """Ctrl-C or SIGTERM on Ray: the driver passes the stop on to the learner actor, which checkpoints after
    its step as a local run does (the driver used to kill it: no checkpoint; SIGTERM exited 1 with a stack
    dump), and --resume goes on to the uninterrupted run's metrics and samples."""
    import signal

    from stalerl.guards import Interrupted

    config = checkpointed(tmp_path, "stopped", "exact", steps=24)
    config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, every=1000))
    metrics = tmp_path / "stopped" / "metrics.jsonl"

    def signal_after_three_steps():
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=signal_after_three_steps, daemon=True)
    sender.start()
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM after step (\d+); checkpoint .*; continue with"):
        train_on_ray(config)
    sender.join()
    assert len(list_checkpoints(tmp_path / "stopped")) == 1 and not (tmp_path / "stopped" / "summary.json").exists()
    assert train_on_ray(config, resume=True)["steps"] == config.steps
    assert_same_run(tmp_path / "stopped", uninterrupted_exact_run)


def test_the_cli_resumes_on_ray_and_reports_a_learner_failure_in_one_line(monkeypatch, capsys, tmp_path):
    import stalerl.ray_runtime as ray_runtime
    from stalerl.cli import main
    from stalerl.config import save_config

    calls = []

    def learner_dies(config, resume=False):
        calls.append(resume)
        raise ray_runtime.LearnerFailed(f"learner died: killed; continue with: stalerl train --resume {config.out}")

    monkeypatch.setattr(ray_runtime, "train_on_ray", learner_dies)
    run = tmp_path / "run"
    run.mkdir()
    save_config(ray_config(tmp_path, "run", "exact", 1, steps=4), run / "config.yaml")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 1
    assert calls == [True]  # --resume is no longer refused on Ray
    lines = capsys.readouterr().err.splitlines()  # Ray may forward earlier actors' log lines here too
    assert f"stalerl: error: learner died: killed; continue with: stalerl train --resume {run}" in lines


def test_run_configs_on_ray_returns_each_runs_summary(local_ray, tmp_path):
    base = ray_config(tmp_path, "unused", "exact", 0, steps=3)
    configs = [dataclasses.replace(base, out=str(tmp_path / f"cell{i}"), seed=i,
                                   runtime=RuntimeConfig()) for i in range(2)]
    (tmp_path / "cell1").mkdir()
    (tmp_path / "cell1" / "metrics.jsonl").write_text("")  # a cell that fails: reported, not fatal
    summaries = run_configs_on_ray(configs, cpus_per_run=0.5, address=None)
    assert summaries[0]["steps"] == 3 and summaries[0]["seed"] == 0
    assert (tmp_path / "cell0" / "summary.json").is_file()
    assert summaries[1]["out"] == str(tmp_path / "cell1") and "already holds a run" in summaries[1]["error"]


def test_sweep_cells_get_their_gpus_in_an_actor_of_their_own(local_ray, tmp_path):
    plain = dataclasses.replace(ray_config(tmp_path, "vllm-cell", "exact", 0, steps=3), runtime=RuntimeConfig())
    vllm = dataclasses.replace(plain, model=dataclasses.replace(plain.model, name_or_path="some/checkpoint"),
                               rollout=dataclasses.replace(plain.rollout, engine="vllm"),
                               runtime=RuntimeConfig(learner_gpus=1))
    # An actor per cell, so a process per cell: vLLM cannot be torn down in process (vllm#21073).
    [summary] = run_configs_on_ray([vllm], cpus_per_run=0.5, address=None)  # Ray places it on a GPU
    assert "rollout.engine: vllm" in summary["error"]  # refused in its actor: no GPU here (or no vllm)
    with pytest.raises(ConfigError, match="runtime.learner_gpus: a sweep cell asks for 3 GPUs; the cluster has 2"):
        run_configs_on_ray([dataclasses.replace(plain, runtime=RuntimeConfig(learner_gpus=3))], cpus_per_run=0.5)


def test_no_sweep_cell_starts_once_the_sweep_is_stopping(local_ray, tmp_path):
    from stalerl.lab.sweep import SweepStop

    stop = SweepStop(threading.Event())
    stop.requested = "SIGTERM"  # as if it came while the cells waited for room
    config = dataclasses.replace(ray_config(tmp_path, "cell", "exact", 0, steps=3), runtime=RuntimeConfig())
    [result] = run_configs_on_ray([config], cpus_per_run=0.5, stop=stop)
    assert result == {"out": config.out, "interrupted": NOT_STARTED}
    assert not (tmp_path / "cell").exists()


def test_stalerl_sweep_runs_its_cells_as_ray_tasks(local_ray, tmp_path, capsys):
    from stalerl.cli import main

    out = tmp_path / "sweep"
    argv = ["sweep", "--staleness", "0,1", "--lr", "1e-4", "--steps", "3", "--out", str(out), "--runtime", "ray",
            "--cpus-per-run", "0.5", "--no-progress", "--no-figures", "--set", "rollout.prompts_per_step=2",
            "--set", "rollout.group_size=4", "--set", "task.val_size=32", "--set", "val_every=3"]
    assert main(argv) == 0
    table = json.loads((out / "sweep.json").read_text())
    assert sorted((row["S"], row["steps"]) for row in table) == [(0, 3), (1, 3)]
    walls = {row["run_dir"]: row["wall_s"] for row in table}
    assert main(argv) == 0  # finished cells are not rerun
    assert {row["run_dir"]: row["wall_s"] for row in json.loads((out / "sweep.json").read_text())} == walls
    capsys.readouterr()


def test_sigterm_stops_a_ray_sweep_with_a_checkpoint_in_each_cell_and_the_rerun_goes_on(local_ray, tmp_path):
    """The driver used to exit (134, Ray's stack dump) and Ray killed the cells' tasks: no checkpoint. Now
    each cell's actor gets the stop, checkpoints after its step, and the same command goes on from there.
    (That a run resumed on Ray makes the uninterrupted run's metrics bit for bit, the tests above check.)"""
    import signal
    import subprocess

    from stalerl.cli import main

    argv = ["sweep", "--staleness", "0,1", "--lr", "1e-4", "--steps", "60", "--runtime", "ray", "--cpus-per-run", "0.5",
            "--no-progress", "--no-figures", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=4",
            "--set", "task.val_size=32", "--set", "val_every=1000", "--set", "checkpoint.every=0"]
    # 60 steps: a step takes ~0.2 s here, and the second cell's actor can start some 15 steps after the first's.
    out = tmp_path / "stopped"
    # Its own Ray, as from a shell: the signal goes to a driver that started Ray itself.
    sweep = subprocess.Popen([sys.executable, "-m", "stalerl.cli", *argv, "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    cells = ["S0-lr0.0001-seed0", "S1-lr0.0001-seed0"]
    deadline = time.monotonic() + 240
    while not all((out / cell / "metrics.jsonl").is_file() and
                  len((out / cell / "metrics.jsonl").read_text().splitlines()) >= 2 for cell in cells):
        if sweep.poll() is not None or time.monotonic() > deadline:
            os.killpg(sweep.pid, signal.SIGKILL)  # the driver and the Ray it started
            raise AssertionError(f"the cells made no steps in time: {sweep.communicate()}")
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    assert "Traceback" not in stderr and "SIGTERM: the sweep stops" in stderr, stderr
    for cell in cells:
        assert f"stalerl: {cell}: stopped by SIGTERM after step" in stderr  # where it stopped, how to go on
        assert len(list_checkpoints(out / cell)) == 1 and not (out / cell / "summary.json").exists()
    assert "0 of 2 cells finished (2 stopped or not started); rerun the same command" in stderr
    assert json.loads((out / "sweep.json").read_text()) == []
    before = {cell: read_metrics(out / cell) for cell in cells}

    assert main([*argv, "--out", str(out)]) == 0  # the same command, in this process's Ray: resumed on Ray
    for cell in cells:
        rows = read_metrics(out / cell)
        assert rows[:len(before[cell])] == before[cell]  # timings too: resumed, not started over
        assert [row["step"] for row in rows] == list(range(60))
        assert [row["step"] for row in read_lines(out / cell / "samples.jsonl")] == list(range(60))
    assert [row["steps"] for row in json.loads((out / "sweep.json").read_text())] == [60, 60]


# ---------------------------------------------------------------- stub workers: faults at stub speed


class StubEngine:
    def __init__(self):
        self.version = 0

    def load_weights(self, state_dict, version):
        assert int(state_dict["w"]) == version  # the weights that arrive are the version announced
        self.version = version

    def close(self):
        pass


@dataclass
class StubBatch:
    batch_index: int
    version: int
    sample_ids: list[int]
    gen_s: float = 0.0
    extras: dict = field(default_factory=dict)


class StubWorker:
    """Makes batch i in a few ms; the first attempt at batch `fault_at` raises, hangs or is slow (once per run)."""

    def __init__(self, marker_dir: str, fault: str, fault_at: int = 5, always: bool = False):
        self.engine = StubEngine()
        self.marker = Path(marker_dir) / f"{fault}-{fault_at}"
        self.fault, self.fault_at, self.always = fault, fault_at, always

    def produce(self, batch_index):
        time.sleep(0.003)
        if batch_index == self.fault_at and (self.always or not self.marker.exists()):
            self.marker.touch()
            if self.fault == "raise":
                raise ValueError("reward exploded")
            if self.fault == "hang":
                time.sleep(3600)
            if self.fault == "slow":  # done, late: batches after it are done first
                time.sleep(2)
        ids = list(range(batch_index * SAMPLES_PER_BATCH, (batch_index + 1) * SAMPLES_PER_BATCH))
        return StubBatch(batch_index, self.engine.version, ids, gen_s=0.003)


class GpuReportingWorker(StubWorker):
    """A stub worker whose batches say which GPUs Ray gave its actor."""

    def produce(self, batch_index):
        batch = super().produce(batch_index)
        batch.extras["gpus"] = (ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        return batch


def run_stub_learner(source, mode, staleness, steps):
    lags, ids = [], []
    try:
        for step in range(steps):
            batch = source.next_batch()
            lags.append(check_lag(mode, staleness, step, batch.version))
            ids.extend(batch.sample_ids)
            source.publish({"w": torch.tensor(step + 1)}, version=step + 1)
    finally:
        source.close()
    return lags, ids


def stub_source(tmp_path, fault, mode, staleness, steps, timeout_s=60.0, **worker):
    build = functools.partial(StubWorker, str(tmp_path), fault, **worker)
    return RayRollouts(build, {"w": torch.tensor(0)}, mode, staleness, steps, num_workers=2, worker_cpus=0.25,
                       worker_timeout_s=timeout_s)


def test_rollout_actors_started_ahead_are_taken_over_not_started_again(local_ray, tmp_path):
    """What the learner actor does: start the actors first (start_rollout_actors), hand them to RayRollouts."""
    from stalerl.ray_rollouts import RolloutActor, StartedActors, launch_rollout_actor

    build = functools.partial(StubWorker, str(tmp_path), "none")
    actor_class = ray.remote(RolloutActor)
    started = StartedActors("ahead", [launch_rollout_actor(actor_class, "ahead", worker_id, 0, build, 1, 0.25, 0)
                                      for worker_id in range(2)])
    source = RayRollouts(build, {"w": torch.tensor(0)}, "exact", 2, 10, num_workers=2, worker_cpus=0.25,
                         started=started)
    names = {n for n in ray.util.list_named_actors() if n.startswith("stalerl-rollout-ahead-")}
    assert names == {"stalerl-rollout-ahead-w0-0", "stalerl-rollout-ahead-w1-0"}  # taken over, none started
    lags, ids = run_stub_learner(source, "exact", 2, 10)
    assert lags == [min(step, 2) for step in range(10)] and ids == list(range(10 * SAMPLES_PER_BATCH))
    assert source.report()["lost_batches"] == 0


@pytest.mark.parametrize("mode", ["exact", "bounded"])
def test_a_raising_worker_is_replaced_and_the_batch_regenerated(local_ray, tmp_path, mode):
    steps = 20
    source = stub_source(tmp_path, "raise", mode, 3, steps)
    lags, ids = run_stub_learner(source, mode, 3, steps)
    assert ids == list(range(steps * SAMPLES_PER_BATCH))  # batch 5 came once, after its regeneration
    assert source.report()["lost_batches"] == 1


def test_a_hung_worker_is_killed_by_the_timeout_and_replaced(local_ray, tmp_path):
    steps = 12
    source = stub_source(tmp_path, "hang", "exact", 2, steps, timeout_s=2.0)
    started = time.perf_counter()
    lags, ids = run_stub_learner(source, "exact", 2, steps)
    assert time.perf_counter() - started < 60  # not the hour the hung call would take
    assert lags == [min(step, 2) for step in range(steps)]
    assert ids == list(range(steps * SAMPLES_PER_BATCH))
    assert source.report()["lost_batches"] == 1


def test_rollout_actors_get_their_gpu_share(local_ray, tmp_path):
    steps = 6
    source = RayRollouts(functools.partial(GpuReportingWorker, str(tmp_path), "none"), {"w": torch.tensor(0)},
                         "exact", 1, steps, num_workers=2, worker_cpus=0.25, worker_gpus=0.5)
    reports = []
    try:
        for step in range(steps):
            reports.append(source.next_batch().extras["gpus"])
            source.publish({"w": torch.tensor(step + 1)}, version=step + 1)
    finally:
        source.close()
    for gpu_ids, visible in reports:  # one GPU id each, and CUDA_VISIBLE_DEVICES narrowed to it
        assert len(gpu_ids) == 1 and visible == str(gpu_ids[0])


def test_a_batch_that_always_fails_stops_the_run(local_ray, tmp_path):
    source = stub_source(tmp_path, "raise", "bounded", 1, 10, always=True)
    with pytest.raises(RolloutWorkerError, match="batch 5 failed 3 times.*reward exploded"):
        run_stub_learner(source, "bounded", 1, 10)


def run_stub_steps(source, first, last, log):
    for step in range(first, last):
        batch = source.next_batch()
        log.append((batch.batch_index, batch.version, batch.sample_ids))
        source.publish({"w": torch.tensor(step + 1)}, version=step + 1)


@pytest.mark.parametrize("case", ["exact", "exact, bad step", "bounded, a gap"])
def test_snapshot_then_restart_continues_the_pipeline(local_ray, tmp_path, case):
    mode, staleness, steps, stop = case.split(",")[0], 2, 16, 6
    fault = "slow" if "gap" in case else "none"  # bounded: batch `stop` comes 2 s late
    source = stub_source(tmp_path, fault, mode, staleness, steps, fault_at=stop)
    log: list[tuple] = []
    run_stub_steps(source, 0, stop, log)
    if "bad step" in case:  # train.py's checkpoint before a bad step: the batch in hand put back first
        in_hand = source.next_batch()
        state = source.snapshot(version=stop)
        state = PipelineState(state.version, state.next_batch, [in_hand, *state.batches])
    else:
        state = source.snapshot(version=stop)
    assert state.version == stop
    assert [batch.batch_index for batch in state.batches] == list(range(stop, state.next_batch))
    if mode == "exact":  # exactly the batches sampled before theta_stop
        assert state.next_batch == stop + staleness
    else:
        assert state.next_batch == stop  # the late batch was in flight: it and those after it are made again
    if "bad step" not in case:  # the run goes on after a checkpoint: the snapshot took nothing away
        going_on: list[tuple] = []
        run_stub_steps(source, stop, stop + staleness + 1, going_on)
    source.close()

    build = functools.partial(StubWorker, str(tmp_path), fault, fault_at=stop)
    restarted = RayRollouts(build, {"w": torch.tensor(stop)}, mode, staleness, steps, num_workers=2,
                            worker_cpus=0.25, start=state)  # the learner's theta_stop
    resumed: list[tuple] = []
    run_stub_steps(restarted, stop, steps, resumed)
    restarted.close()
    log += resumed
    assert [index for index, _, _ in log] == list(range(steps))
    assert [i for _, _, ids in log for i in ids] == list(range(steps * SAMPLES_PER_BATCH))  # none lost or repeated
    lags = [step - version for step, (_, version, _) in enumerate(log)]
    if mode == "exact":
        assert lags == [min(step, staleness) for step in range(steps)]
        if "bad step" not in case:
            assert resumed[:len(going_on)] == going_on  # the same batches as the run that went on
    else:
        assert 0 <= min(lags) and max(lags) <= staleness
