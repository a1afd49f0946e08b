"""The local runtime's rollout worker in a process of its own (runtime.local_worker: process).

A rollout thread shares the learner's GIL: on the embedded default, overlapping them makes the
learner's step 1.24x and the rollout batch 1.41x slower than alone, where two processes slow them
by 1.03x and 1.08x (benchmarks/contention.py). Here the worker is a spawned child process with its
own copy of the policy, built from the run's config as a Ray rollout actor builds it, and the same
staleness contract as ThreadedRollouts (staleness.produce_batches runs in the child):

* weights: one set of shared-memory buffers (CUDA IPC on a GPU) and a version slot under a
  process-shared lock, so the pipeline holds one staged copy of the weights, as the thread does;
* batches: pickled by the child, unpickled by the learner (plain bytes: nothing the child made
  has to outlive it);
* the child starts from the weights in the buffers (theta_0, or a checkpoint's theta_V), ignores
  Ctrl-C (the learner stops the run and then closes it), and exits if the learner's process dies.

Starting costs a few seconds (the child imports torch and transformers and builds its model), so
it pays off for runs with S >= 1 long enough to win them back; the README has the figures.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.multiprocessing

from stalerl.guards import exit_with
from stalerl.staleness import (
    MailboxClosed,
    Mode,
    PipelineState,
    QueuedRollouts,
    WorkerFailure,
    WorkerLost,
    produce_batches,
)

if TYPE_CHECKING:
    from stalerl.config import TrainConfig
    from stalerl.rollout import RolloutEngine

_EMPTY = -1  # the version slot holds no weights


class SharedWeightMailbox:
    """A one-slot handoff of weights from the learner's process to the worker's (WeightMailbox's
    contract). Picklable: it travels to the child as a Process argument."""

    def __init__(self, state_dict: dict[str, torch.Tensor], version: int, deliver_every_version: bool,
                 context: Any):  # a multiprocessing context: its Condition and Values are shared with the child
        self.buffers = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        for tensor in self.buffers.values():
            if tensor.device.type == "cpu":
                tensor.share_memory_()  # CUDA tensors travel by IPC handle
        self.on_gpu = any(tensor.is_cuda for tensor in self.buffers.values())
        self.deliver_every_version = deliver_every_version
        self._condition = context.Condition()
        self._slot = context.Value("q", version, lock=False)  # staged: the child's first load
        self._closed = context.Value("b", 0, lock=False)

    def publish(self, state_dict: dict[str, torch.Tensor], version: int, worker_alive: Callable[[], bool]) -> None:
        """Stages theta_version; in exact mode, once the worker has taken the version before it. A worker
        that died meanwhile (killed, out of memory) is reported instead of waited for forever."""
        with self._condition:
            while self.deliver_every_version and not self._condition.wait_for(
                    lambda: self._slot.value == _EMPTY or self._closed.value, timeout=1.0):
                if not worker_alive():
                    raise WorkerLost("rollout worker process exited before taking the learner's weights")
            if self._closed.value:
                return
            for name, tensor in state_dict.items():
                self.buffers[name].copy_(tensor.detach())
            if self.on_gpu:
                torch.cuda.synchronize()  # the child reads on its own stream, in its own process
            self._slot.value = version
            self._condition.notify_all()

    def load_into(self, engine: RolloutEngine, min_version: int, block: bool) -> None:
        """Loads the staged weights into the child's engine if their version is >= min_version;
        under the lock, since the learner may stage a newer version into the same buffers."""
        with self._condition:
            ready = lambda: self._closed.value or self._slot.value >= min_version  # noqa: E731
            if block:
                self._condition.wait_for(ready)
            if self._closed.value:
                raise MailboxClosed
            if not ready():
                return
            engine.load_weights(self.buffers, self._slot.value)
            self._slot.value = _EMPTY
            self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed.value = 1
            self._condition.notify_all()


def _picklable(item: object) -> bytes:
    try:
        return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle still reaches the learner, as text
        error = item.error if isinstance(item, WorkerFailure) else item
        return pickle.dumps(WorkerFailure(RuntimeError(f"{error!r} (not picklable)")))


def _worker_main(config_data: dict[str, Any], mailbox: SharedWeightMailbox, batches, stop, first_batch: int,
                 parent_pid: int) -> None:
    """The child: builds its rollout worker, then produce_batches until done, stopped or closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the learner's to handle; it closes this
    exit_with(parent_pid, "stalerl-follow-learner")
    from stalerl.config import TrainConfig, from_dict
    from stalerl.train import build_rollout_worker_from_config

    def put(item: object) -> None:
        batches.put(_picklable(item))

    try:
        config = from_dict(TrainConfig, config_data)
        if config.threads:
            torch.set_num_threads(config.threads)
        worker = build_rollout_worker_from_config(config)
        mailbox.load_into(worker.engine, min_version=0, block=True)  # the learner's weights, staged before the start
    except MailboxClosed:
        return
    except BaseException as error:
        put(WorkerFailure(error))
        mailbox.close()  # a learner waiting to publish wakes up
        return
    mode, staleness = config.staleness.mode, config.staleness.staleness
    produce_batches(worker.engine, worker.produce, mode, staleness, range(first_batch, config.steps), mailbox, put,
                    stop.is_set)
    worker.engine.close()
    if stop.is_set():  # the learner reads nothing more: exit without waiting to flush unread batches
        batches.cancel_join_thread()


class ProcessRollouts(QueuedRollouts):
    """Local runtime: one rollout worker process, up to S steps ahead of the learner (module doc)."""

    def __init__(self, config: TrainConfig, initial_weights: dict[str, torch.Tensor], start: PipelineState | None = None):
        """`initial_weights`: the learner's theta_0, or theta_{start.version} when resuming from `start`."""
        mode: Mode = config.staleness.mode
        context = torch.multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads
        self._mailbox = SharedWeightMailbox(initial_weights, start.version if start else 0,
                                            deliver_every_version=(mode == "exact"), context=context)
        super().__init__(mode, config.staleness.staleness, config.steps, start)
        self._batches = context.Queue()
        self._stop = context.Event()
        self._process = context.Process(
            target=_worker_main, name="stalerl-rollout-worker", daemon=True,
            args=(config.to_dict(), self._mailbox, self._batches, self._stop, self._first_batch, os.getpid()))
        self._process.start()

    def _hand_over(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self._mailbox.publish(state_dict, version, worker_alive=self._process.is_alive)

    def _get(self, block: bool) -> object:
        while True:
            try:
                # Bytes from this run's own child process (the learner spawned it): not untrusted input.
                return pickle.loads(self._batches.get(timeout=1.0) if block else self._batches.get_nowait())
            except queue.Empty:
                if not block:
                    raise
                if not self._process.is_alive():
                    try:  # what it put just before it exited
                        return pickle.loads(self._batches.get(timeout=1.0))
                    except queue.Empty:
                        raise WorkerLost(f"rollout worker process exited (code {self._process.exitcode}) "
                                         f"without the next batch") from None

    def close(self) -> None:
        self._stop.set()
        self._mailbox.close()
        self._process.join(timeout=10)  # a batch in production is discarded, not awaited past this
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._batches.close()
        self._batches.cancel_join_thread()
        if self._mailbox.on_gpu:  # the child has let go of the buffers: free what CUDA IPC still holds for it
            torch.cuda.ipc_collect()

    def report(self) -> dict:
        return {"runtime": "local", "worker": "process", "num_workers": 1, "lost_batches": 0}
