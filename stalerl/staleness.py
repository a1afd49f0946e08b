"""Staleness control: which policy version a rollout may be sampled with, enforced at the producer.

Batch i is consumed by learner step i, so its lag is ``i - v`` where v is the version that sampled
it. Before producing batch i the rollout worker syncs its weights:

* exact:   v = max(0, i - S) exactly. Every version is delivered in order; the learner's publish
           waits while the previous version is still undelivered, so the pipeline is S deep and
           holds one staged copy of the weights, never S of them.
* bounded: v >= i - S, the newest version published so far. A worker that is S versions ahead
           waits (paced, not discarded). Every consumed sample has lag in [0, S].

Here the worker is a thread of the learner's process (the local runtime); the weights travel
through a one-slot mailbox and the batches through a queue. ``produce_batches`` is the worker's
loop and ``QueuedRollouts`` the learner's side of it, shared with process_rollouts.py, where the
same worker runs in a process of its own (runtime.local_worker: process).

Checkpoints (checkpoint.py) need the pipeline's state between two learner steps. When the learner
holds theta_V, exact mode has batches V..V+S-1 sampled from versions older than V that nobody keeps
any more: they cannot be regenerated, so they are saved. Batch V+S onward needs theta_V or newer:
it is regenerated on resume. ``snapshot(V)`` waits until the worker has produced every batch up to
V+S-1 (none of them needs a version the learner has not published), then returns the unconsumed
ones as a ``PipelineState``; ``ThreadedRollouts(..., start=state)`` puts them back in front of the
queue and starts the worker at ``state.next_batch``. Bounded mode saves whatever is queued now and
regenerates the rest with the learner's weights: no sample is lost or used twice, every lag stays
in [0, S], but the regenerated batches may differ from the uninterrupted run's. The Ray runtime's
``RayRollouts`` (ray_rollouts.py) keeps the same contract with N worker actors.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Protocol

import torch

from stalerl.streams import CopyReady, finished_on_own_stream, run_on_stream, staged_copy_ready, used_on_current_stream

if TYPE_CHECKING:  # annotations only: Ray's stub actors import this module without transformers
    from stalerl.rollout import RolloutBatch, RolloutEngine

Mode = Literal["exact", "bounded"]


def required_version(batch_index: int, staleness: int) -> int:
    """The version batch i must be sampled with (exact) or at least with (bounded)."""
    return max(0, batch_index - staleness)


def check_lag(mode: Mode, staleness: int, step: int, version: int) -> int:
    """The lag of a batch consumed at `step`; raises if the staleness contract was broken."""
    lag = step - version
    expected_ok = lag == min(step, staleness) if mode == "exact" else 0 <= lag <= staleness
    if not expected_ok:
        raise RuntimeError(f"staleness violated: step {step} got version {version} (mode {mode}, S={staleness})")
    return lag


@dataclass
class PipelineState:
    """The rollout pipeline between two learner steps, as a checkpoint keeps it (module doc)."""

    version: int  # the learner's weights theta_version; a resumed worker starts from exactly these
    next_batch: int  # the first batch index that is not in `batches` and not consumed: made on resume
    batches: list[RolloutBatch] = field(default_factory=list)  # produced, not consumed, in batch order


class RolloutSource(Protocol):
    """The learner's side of the transport between rollout workers and learner (threads, Ray)."""

    def next_batch(self) -> RolloutBatch: ...

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    def close(self) -> None: ...

    def report(self) -> dict: ...  # per-worker throughput and lost work, for summary.json

    def snapshot(self, version: int) -> PipelineState:
        """The pipeline's state for a checkpoint while the learner holds theta_version (the newest
        version published): in exact mode it first waits for every batch that needs an older version.
        The batches returned are still served afterwards (the run goes on after a periodic checkpoint),
        and ``start=`` of the same source type restarts from the state (module doc)."""
        ...


class RolloutWorkerError(RuntimeError):
    pass


class WorkerLost(RolloutWorkerError):
    """The worker's process is gone (killed, out of memory): the run can go on from a checkpoint."""


class MailboxClosed(Exception):
    """The learner closed the weight mailbox: the worker stops."""


class WeightMailbox:
    """A one-slot handoff of weights from learner to rollout worker."""

    def __init__(self, deliver_every_version: bool):
        self.deliver_every_version = deliver_every_version
        self._slot: tuple[dict[str, torch.Tensor], int, CopyReady | None] | None = None
        self._closed = False
        self._condition = threading.Condition()

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        with self._condition:
            if self.deliver_every_version:
                self._condition.wait_for(lambda: self._slot is None or self._closed)
            if self._closed:
                return
            copy = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
            # On a GPU the clone is queued on the learner's stream: a worker on a stream of its own
            # waits for this event before it reads the copy (streams.py).
            self._slot = (copy, version, staged_copy_ready(copy.values()))
            self._condition.notify_all()

    def take(self, min_version: int, block: bool) -> tuple[dict[str, torch.Tensor], int] | None:
        """The staged weights if their version is >= min_version; waits for them if `block`.
        On a GPU, the calling thread's stream will have waited for the learner's copy."""
        with self._condition:
            ready = lambda: self._closed or (self._slot is not None and self._slot[1] >= min_version)  # noqa: E731
            if block:
                self._condition.wait_for(ready)
            if self._closed:
                raise MailboxClosed
            if not ready():
                return None
            (state_dict, version, copied), self._slot = self._slot, None
            self._condition.notify_all()
        if copied is not None:
            copied.wait()
        return state_dict, version

    def load_into(self, engine: RolloutEngine, min_version: int, block: bool) -> None:
        """Loads the staged weights into `engine` if their version is >= min_version (see take)."""
        item = self.take(min_version, block)
        if item is not None:  # a private copy: loaded outside the lock
            engine.load_weights(*item)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()


class Mailbox(Protocol):
    """The worker's side of a weight mailbox: WeightMailbox (a thread), or process_rollouts' shared one."""

    def load_into(self, engine: RolloutEngine, min_version: int, block: bool) -> None: ...

    def close(self) -> None: ...


class WorkerFailure:
    """What a worker puts in place of a batch when it fails: the learner raises it (RolloutWorkerError)."""

    def __init__(self, error: BaseException):
        self.error = error


def sync_weights(engine: RolloutEngine, mailbox: Mailbox, mode: Mode, staleness: int, batch_index: int) -> None:
    """Before batch i: exact mode loads versions one by one, in order, up to i - S; bounded mode
    loads the newest version on offer, and waits only when the worker would get more than S ahead."""
    needed = required_version(batch_index, staleness)
    if mode == "exact":
        while engine.version < needed:
            mailbox.load_into(engine, engine.version + 1, block=True)
    else:
        mailbox.load_into(engine, max(needed, engine.version + 1), block=engine.version < needed)


def produce_batches(engine: RolloutEngine, produce: Callable[[int], RolloutBatch], mode: Mode, staleness: int,
                    batches: range, mailbox: Mailbox, put: Callable[[object], None], stop: Callable[[], bool]) -> None:
    """The rollout worker's loop, in a thread or a process of its own: each batch after its weights.
    A failure is handed to the learner (`put`), which raises it; a closed mailbox ends the loop."""
    try:
        for batch_index in batches:
            if stop():
                return
            sync_weights(engine, mailbox, mode, staleness, batch_index)
            put(produce(batch_index))
    except MailboxClosed:
        return
    except BaseException as error:
        put(WorkerFailure(error))
    finally:
        mailbox.close()


class QueuedRollouts:
    """The learner's side of one rollout worker that feeds it through a queue, up to S steps ahead:
    ThreadedRollouts (a thread) and process_rollouts.ProcessRollouts (a process of its own)."""

    def __init__(self, mode: Mode, staleness: int, total_batches: int, start: PipelineState | None):
        self.mode = mode
        self.staleness = staleness
        self.total_batches = total_batches
        # Batches the learner has taken off the queue for a snapshot (or restored from one): served first.
        self._ready: deque[RolloutBatch] = deque(start.batches if start else [])
        self._first_batch = start.next_batch if start else 0
        self._taken_until = self._first_batch  # 1 + the index of the last batch taken off the queue

    def _get(self, block: bool) -> object:
        """The next item the worker put: a batch or a WorkerFailure; raises queue.Empty if none and not `block`."""
        raise NotImplementedError

    def _hand_over(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Stages theta_version in the worker's mailbox (in exact mode, once it took the one before)."""
        raise NotImplementedError

    def next_batch(self) -> RolloutBatch:
        return self._ready.popleft() if self._ready else self._take(block=True)

    def _take(self, block: bool) -> RolloutBatch:
        item = self._get(block)
        if isinstance(item, WorkerFailure):
            raise RolloutWorkerError(f"rollout worker failed: {item.error!r}") from item.error
        self._taken_until = item.batch_index + 1
        return item

    def snapshot(self, version: int) -> PipelineState:
        """See RolloutSource.snapshot and the module doc."""
        if self.mode == "exact":
            last_old = min(version - 1 + self.staleness, self.total_batches - 1)  # sampled before theta_version
            while self._taken_until <= last_old:
                self._ready.append(self._take(block=True))
        else:  # bounded: what is queued now; the batch in production is made again on resume
            while True:
                try:
                    self._ready.append(self._take(block=False))
                except queue.Empty:
                    break
        # Batches the learner has taken (and holds) are not made again: the worker restarts after them.
        return PipelineState(version, self._taken_until, list(self._ready))

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Hands theta_version to the worker, if any batch still to be produced may use it."""
        last_useful = self.total_batches - 1 - (self.staleness if self.mode == "exact" else 0)
        if version <= last_useful:
            self._hand_over(state_dict, version)


class ThreadedRollouts(QueuedRollouts):
    """Local runtime: one rollout worker thread, up to S steps ahead of the learner."""

    def __init__(
        self,
        engine: RolloutEngine,
        produce: Callable[[int], RolloutBatch],
        mode: Mode,
        staleness: int,
        total_batches: int,
        start: PipelineState | None = None,
        cuda_stream: torch.cuda.Stream | None = None,
    ):
        """`start`: resume from a checkpoint's pipeline; the engine must already hold theta_{start.version}.
        `cuda_stream`: the stream the worker's kernels run on (runtime.rollout_cuda_stream: own;
        streams.py); None: the thread's default one, which the learner's kernels share."""
        super().__init__(mode, staleness, total_batches, start)
        self._mailbox = WeightMailbox(deliver_every_version=(mode == "exact"))
        self.engine = engine
        self._batches: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._cuda_stream = cuda_stream
        if cuda_stream is not None:
            # The worker's first kernels come after what the learner queued so far (the worker's copy of the policy).
            cuda_stream.wait_stream(torch.cuda.current_stream(cuda_stream.device))
            produce = finished_on_own_stream(produce, cuda_stream)
        self._thread = threading.Thread(
            target=run_on_stream, name="stalerl-rollout-worker", daemon=True,
            args=(cuda_stream, produce_batches, engine, produce, mode, staleness,
                  range(self._first_batch, total_batches), self._mailbox, self._batches.put, self._stop.is_set))
        self._thread.start()

    def _get(self, block: bool) -> object:
        item = self._batches.get(block=block)
        if self._cuda_stream is not None and not isinstance(item, WorkerFailure):
            used_on_current_stream(item)  # the learner's stream, not the worker's, frees its memory
        return item

    def _hand_over(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self._mailbox.publish(state_dict, version)

    def close(self) -> None:
        """Stops the worker after the batch it is making, and waits for it: a process that exits while a
        daemon thread is inside torch aborts (exit code 134, not the run's own). Its queue is unbounded
        and its mailbox is closed, so nothing else can hold it."""
        self._stop.set()
        self._mailbox.close()
        self._thread.join()
        self.engine.close()

    def report(self) -> dict:
        return {"runtime": "local", "worker": "thread", "num_workers": 1, "lost_batches": 0,  # a thread is not restarted
                "cuda_stream": "default" if self._cuda_stream is None else "own"}
