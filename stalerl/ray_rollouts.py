"""The Ray transport: N rollout-worker actors feeding one learner, with the local runtime's guarantees.

The learner's loop (train.py) is the same as in the local runtime; only the ``RolloutSource`` differs.
``RayRollouts`` lives in the learner's process and hands out batch indices to idle actors:

* admission: batch i is dispatched only once theta_{max(0, i-S)} has been published, so a worker
  that would get more than S versions ahead waits for weights (paced, never discarded);
* exact:   batch i is sampled with theta_{max(0, i-S)} exactly, whichever actor makes it, and is
           seeded by (seed, i) (``RolloutWorker.produce``): the batches equal the local runtime's;
* bounded: batch i is sampled with the newest version at dispatch, >= i - S and <= i.

Weights go through the object store: one ``ray.put`` per version, refs to the actors, which fetch a
version only when they need it. Exact mode keeps only the versions that a batch not yet made still
needs (at most N + 1: ``publish`` waits otherwise), so memory does not grow with S.

Checkpoints: ``snapshot(V)`` keeps the local runtime's contract (staleness.py): in exact mode it waits
until batches V..V+S-1 (sampled before theta_V, so never made again) are done and returns them,
leaving them in place for the run to go on; bounded mode returns the batches done in order from the
next unconsumed one, and whatever was done beyond a gap or is in flight is made again on resume.
``RayRollouts(..., start=state)`` restarts from such a state with the learner's theta_V.

GPUs: each actor asks Ray for ``worker_gpus`` (runtime.worker_gpus; a fraction shares one GPU), so
Ray places it on a GPU node and sets its CUDA_VISIBLE_DEVICES. An actor that asks for none is not
narrowed by Ray (2.49 and later): it sees every GPU of its node and uses the first.

Faults: a batch whose actor died (killed process, raised exception) or did not answer within
``worker_timeout_s`` (the actor is then killed: ``ray.get(timeout=...)`` alone would not stop it) is
regenerated under the same index on a fresh actor, so exact mode stays exact and no batch is
consumed twice. Lost batches are counted in each batch's ``extras`` and in ``report()``.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import ray
import torch

from stalerl.staleness import Mode, PipelineState, RolloutWorkerError, required_version

if TYPE_CHECKING:
    from stalerl.rollout import RolloutBatch

MAX_ATTEMPTS_PER_BATCH = 3  # a batch that fails this often is a bug, not a fault: the run stops
POLL_S = 0.01  # how often the collector re-lists in-flight batches (new dispatches join its wait)
CLOSE_S = 30.0  # how long close() waits for idle actors to shut their engines down before killing them


class RolloutActor:
    """One rollout worker in its own process: an engine, a task copy, and the run's seed."""

    def __init__(self, build_worker: Callable[[], Any], worker_id: int, threads: int):
        if threads:
            torch.set_num_threads(threads)  # actors share cores; one torch thread each by default
        self.worker = build_worker()
        if torch.cuda.is_initialized():  # the builder's leftovers (a policy the engine copied) go back to the GPU
            torch.cuda.empty_cache()
        self.worker_id = worker_id
        self.loaded: int | None = None  # the version in the engine; None until the first weights arrive

    def ready(self) -> int:
        return self.worker_id

    def produce(self, batch_index: int, version: int, weights: list[ray.ObjectRef]) -> RolloutBatch:
        # `weights` is a one-element list so that Ray passes the ref, not the tensors: the actor
        # fetches a version only when it is not already loaded.
        if self.loaded != version:
            self.worker.engine.load_weights(ray.get(weights[0]), version)
            self.loaded = version
        batch = self.worker.produce(batch_index)
        batch.extras["worker"] = self.worker_id
        return batch

    def close(self) -> None:
        """Shuts the engine down (vLLM's GPU memory) before the actor is killed."""
        self.worker.engine.close()


def _build_worker_from_config(config) -> Any:
    """In a rollout actor: the worker that train.py builds, imported there, not where the actor starts."""
    from stalerl.train import build_rollout_worker_from_config

    return build_rollout_worker_from_config(config)


def launch_rollout_actor(actor_class: Any, tag: str, worker_id: int, generation: int,
                         build_worker: Callable[[], Any], threads: int, cpus: float, gpus: float) -> Any:
    """A RolloutActor named stalerl-rollout-TAG-wWORKER-GENERATION (unique per run: tests find them)."""
    # max_restarts=0: a dead actor is replaced by RayRollouts, where its lost batch is accounted for.
    return actor_class.options(name=f"stalerl-rollout-{tag}-w{worker_id}-{generation}", num_cpus=cpus, num_gpus=gpus,
                               max_restarts=0).remote(build_worker, worker_id, threads)


@dataclass
class StartedActors:
    """A run's rollout actors, started before its learner has imported torch and transformers and built
    its model (ray_runtime.LearnerActor), so that both start up at once; RayRollouts takes them over."""

    tag: str
    actors: list[Any]  # worker i's actor

    def kill(self) -> None:
        for actor in self.actors:  # killing a dead actor is harmless
            ray.kill(actor, no_restart=True)


def start_rollout_actors(config) -> StartedActors:
    """`config`'s rollout actors (runtime.num_workers), building their workers as rollouts_for_config's do."""
    runtime, tag = config.runtime, uuid.uuid4().hex[:8]
    actor_class, build_worker = ray.remote(RolloutActor), functools.partial(_build_worker_from_config, config)
    return StartedActors(tag, [launch_rollout_actor(actor_class, tag, worker_id, 0, build_worker, config.threads,
                                                    runtime.worker_cpus, runtime.worker_gpus)
                               for worker_id in range(runtime.num_workers)])


@dataclass
class _Slot:
    """A worker position: the actor in it is replaced after a fault; the statistics stay."""

    worker_id: int
    actor: Any = None
    restarts: int = 0
    failed_starts: int = 0
    batches: int = 0
    samples: int = 0
    gen_s: float = 0.0
    lags: list[int] = field(default_factory=list)


@dataclass
class _Task:
    batch_index: int
    slot: _Slot
    started: float


class RayRollouts:
    """Ray runtime: N rollout-worker actors, paced so that every batch meets the staleness contract."""

    def __init__(
        self,
        build_worker: Callable[[], Any],
        initial_weights: dict[str, torch.Tensor],
        mode: Mode,
        staleness: int,
        total_batches: int,
        num_workers: int,
        worker_cpus: float = 1.0,
        worker_gpus: float = 0.0,
        worker_timeout_s: float = 300.0,
        threads: int = 1,
        start: PipelineState | None = None,
        started: StartedActors | None = None,
    ):
        """`start`: resume from a checkpoint's pipeline; `initial_weights` must be theta_{start.version}.
        `started`: actors already started for these workers (start_rollout_actors), taken over."""
        if not ray.is_initialized():
            raise RuntimeError("RayRollouts needs a running Ray (stalerl.ray_runtime.ray_session)")
        self.mode, self.staleness, self.total_batches = mode, staleness, total_batches
        self.worker_timeout_s = worker_timeout_s
        self._actor_class = ray.remote(RolloutActor)
        self._worker_cpus, self._worker_gpus = worker_cpus, worker_gpus
        self._build_worker, self._threads = build_worker, threads
        # Actor names are unique per run, so tests can find them; generation 0 may have been started already.
        self._tag = started.tag if started else uuid.uuid4().hex[:8]
        self._generation = itertools.count(1 if started else 0)
        self._lock = threading.Condition()
        self._weights: dict[int, ray.ObjectRef] = {}
        start = start or PipelineState(version=0, next_batch=0)
        self._latest = start.version
        self._next_index = start.next_batch  # the lowest batch index never dispatched
        self._redo: list[int] = []  # lost batches, regenerated before any new one
        self._inflight: dict[ray.ObjectRef, _Task] = {}
        self._starting: dict[ray.ObjectRef, _Slot] = {}  # actors still in their constructor
        self._done: dict[int, RolloutBatch] = {batch.batch_index: batch for batch in start.batches}
        self._attempts: dict[int, int] = {}
        self._consumed = start.batches[0].batch_index if start.batches else start.next_batch  # the next step
        self._lost = 0
        self._failure: BaseException | None = None
        self._closed = False
        self._started = time.perf_counter()
        self._slots = [_Slot(worker_id) for worker_id in range(num_workers)]
        self._idle: list[_Slot] = []
        for slot in self._slots:
            if started:
                slot.actor = started.actors[slot.worker_id]
                self._starting[slot.actor.ready.remote()] = slot
            else:
                self._start_actor(slot)
        # Work starts as each actor is ready; every batch not made yet needs this version or a newer one.
        self._weights[start.version] = ray.put(_detached(initial_weights))
        self._collector = threading.Thread(target=self._collect_forever, name="stalerl-ray-collector", daemon=True)
        self._collector.start()

    # ---------------------------------------------------------------- dispatch (lock held)

    def _start_actor(self, slot: _Slot) -> None:
        slot.actor = launch_rollout_actor(self._actor_class, self._tag, slot.worker_id, next(self._generation),
                                          self._build_worker, self._threads, self._worker_cpus, self._worker_gpus)
        # The slot takes work once the constructor is done, so start-up never counts as a hang.
        self._starting[slot.actor.ready.remote()] = slot

    def _dispatch(self) -> None:
        """Gives idle actors the lowest admissible batches: lost ones first, then new ones in order."""
        while self._idle and self._failure is None and not self._closed:
            if self._redo:
                batch_index = min(self._redo)
            elif self._next_index < self.total_batches and self._latest >= required_version(
                    self._next_index, self.staleness):
                batch_index = self._next_index
            else:
                return
            version = required_version(batch_index, self.staleness) if self.mode == "exact" else self._latest
            slot = self._idle.pop(0)
            ref = slot.actor.produce.remote(batch_index, version, [self._weights[version]])
            self._inflight[ref] = _Task(batch_index, slot, time.perf_counter())
            if batch_index in self._redo:
                self._redo.remove(batch_index)
            else:
                self._next_index += 1

    def _oldest_needed(self) -> int:
        """The oldest version a batch not yet made will be sampled with (exact mode)."""
        pending = [*self._redo, *(task.batch_index for task in self._inflight.values()), self._next_index]
        return required_version(min(pending), self.staleness)

    def _prune_weights(self) -> None:
        keep_from = self._oldest_needed() if self.mode == "exact" else self._latest
        for version in [v for v in self._weights if v < keep_from and v != self._latest]:
            del self._weights[version]  # in-flight tasks hold their own ref until they finish

    def _lose(self, task: _Task, error: BaseException | None) -> None:
        """Replaces the actor of a failed or hung batch and queues the batch for regeneration."""
        slot = task.slot
        ray.kill(slot.actor, no_restart=True)  # a hung actor keeps running unless killed
        self._start_actor(slot)
        slot.restarts += 1
        self._lost += 1
        attempts = self._attempts[task.batch_index] = self._attempts.get(task.batch_index, 1) + 1
        if attempts > MAX_ATTEMPTS_PER_BATCH:
            why = "timed out" if error is None else repr(error)
            self._failure = RolloutWorkerError(
                f"batch {task.batch_index} failed {attempts - 1} times; last: {why}")
        else:
            self._redo.append(task.batch_index)

    # ---------------------------------------------------------------- collector thread

    def _collect_forever(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or self._failure is not None:
                        return
                    refs = [*self._inflight, *self._starting]
                if not refs:
                    with self._lock:
                        self._lock.wait(timeout=POLL_S)
                    continue
                ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
                with self._lock:
                    for ref in ready:
                        self._collect(ref)
                    self._reap_hung()
                    self._dispatch()
                    self._lock.notify_all()
        except BaseException as error:  # a bug here must reach the learner, not die silently
            with self._lock:
                self._failure = error
                self._lock.notify_all()

    def _collect(self, ref: ray.ObjectRef) -> None:
        if ref in self._starting:
            slot = self._starting.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as error:  # killed while starting, or a constructor that fails
                slot.failed_starts += 1
                if slot.failed_starts >= MAX_ATTEMPTS_PER_BATCH:
                    self._failure = RolloutWorkerError(f"rollout actor {slot.worker_id} failed to start: {error}")
                else:
                    slot.restarts += 1
                    self._start_actor(slot)
                return
            slot.failed_starts = 0
            self._idle.append(slot)
            return
        task = self._inflight.pop(ref, None)
        if task is None:  # already written off as hung
            return
        try:
            batch = ray.get(ref)
        except ray.exceptions.RayError as error:  # actor died, or produce raised
            self._lose(task, error)
            return
        slot = task.slot
        slot.batches += 1
        slot.samples += len(batch.sample_ids)
        slot.gen_s += batch.gen_s
        batch.extras["attempts"] = self._attempts.pop(task.batch_index, 1)
        self._done[task.batch_index] = batch
        self._idle.append(slot)

    def _reap_hung(self) -> None:
        now = time.perf_counter()
        for ref, task in list(self._inflight.items()):
            if now - task.started > self.worker_timeout_s:
                del self._inflight[ref]
                self._lose(task, None)

    # ---------------------------------------------------------------- learner side

    def next_batch(self) -> RolloutBatch:
        with self._lock:
            step = self._consumed
            self._lock.wait_for(lambda: step in self._done or self._failure is not None)
            if step not in self._done:
                raise RolloutWorkerError(f"rollout workers failed: {self._failure}") from self._failure
            batch = self._done.pop(step)
            self._consumed += 1
            worker = batch.extras.get("worker")
            if isinstance(worker, int) and worker < len(self._slots):  # restored batches keep their maker's id
                self._slots[worker].lags.append(step - batch.version)
            batch.extras["lost_batches"] = self._lost
            return batch

    def snapshot(self, version: int) -> PipelineState:
        """See RolloutSource.snapshot and the module doc; the batches returned stay to be consumed."""
        with self._lock:
            if self.mode == "exact":  # batches sampled before theta_version: wait for them
                last_old = min(version - 1 + self.staleness, self.total_batches - 1)
                needed = range(self._consumed, last_old + 1)
                self._lock.wait_for(lambda: self._failure is not None or self._closed
                                    or all(index in self._done for index in needed))
                next_batch = max(last_old + 1, self._consumed)
            else:  # bounded: the batches done in order; those beyond a gap are made again on resume
                next_batch = self._consumed
                while next_batch in self._done:
                    next_batch += 1
            batches = [self._done.get(index) for index in range(self._consumed, next_batch)]
            if any(batch is None for batch in batches):  # woken by a failure or close
                raise RolloutWorkerError(f"rollout workers failed: {self._failure or 'closed'}") from self._failure
            return PipelineState(version, next_batch, batches)

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Puts theta_version in the object store once, if any batch still to be made may use it."""
        last_useful = self.total_batches - 1 - (self.staleness if self.mode == "exact" else 0)
        if version > last_useful:
            return
        if self.mode == "exact":  # hold at most N + 1 versions: wait while the workers catch up
            with self._lock:
                self._lock.wait_for(lambda: self._failure is not None or self._closed
                                    or version - self._oldest_needed() <= len(self._slots))
        ref = ray.put(_detached(state_dict))
        with self._lock:
            self._weights[version] = ref
            self._latest = version
            self._prune_weights()
            self._dispatch()
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._collector.join(timeout=60)
        # Idle actors shut their engines down first; busy or starting ones are just killed (a process
        # that exits frees all of its GPU memory, even what an in-process vLLM keeps).
        closing = [slot.actor.close.remote() for slot in self._idle]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_S)
        for slot in self._slots:
            ray.kill(slot.actor, no_restart=True)
        self._weights.clear()
        self._inflight.clear()

    def report(self) -> dict[str, Any]:
        """Per-worker lag and throughput and the lost work, for summary.json."""
        wall_s = time.perf_counter() - self._started
        return {
            "runtime": "ray",
            "num_workers": len(self._slots),
            "lost_batches": self._lost,
            "workers": [{
                "worker": slot.worker_id,
                "batches": slot.batches,
                "samples": slot.samples,
                "samples_per_s": slot.samples / wall_s,  # its share of the run's throughput
                "samples_per_gen_s": slot.samples / slot.gen_s if slot.gen_s else None,
                "lag_mean": sum(slot.lags) / len(slot.lags) if slot.lags else None,
                "lag_max": max(slot.lags, default=None),
                "restarts": slot.restarts,
            } for slot in self._slots],
        }


def _detached(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in state_dict.items()}


def rollouts_for_config(config, initial_weights: dict[str, torch.Tensor], start: PipelineState | None = None,
                        started: StartedActors | None = None) -> RayRollouts:
    """The Ray source for a TrainConfig: actors build their worker from the config as train.py does.
    `start`: a checkpoint's pipeline, `initial_weights` the learner's restored theta_{start.version};
    `started`: the run's actors, if started already (start_rollout_actors)."""
    runtime = config.runtime
    return RayRollouts(
        functools.partial(_build_worker_from_config, config), initial_weights,
        config.staleness.mode, config.staleness.staleness, total_batches=config.steps,
        num_workers=runtime.num_workers, worker_cpus=runtime.worker_cpus, worker_gpus=runtime.worker_gpus,
        worker_timeout_s=runtime.worker_timeout_s, threads=config.threads, start=start, started=started,
    )
