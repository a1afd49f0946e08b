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
  Ctrl-C and SIGTERM (the learner stops the run and then closes it), and exits if the learner's
  process dies.

On CPU the child is forked from the fork server (forking.py), which has imported torch and
transformers already, so it starts with building its model; on a GPU, and inside a process that
the server forked, it is spawned and imports them first (a few seconds), which a run with S >= 1
wins back only after some hundreds of steps (the README has the figures). A forked child is the
server's child, not the learner's, so RUSAGE_CHILDREN never counts it: the child reports its own
CPU time after each batch, and the run's cpu_s adds it (unreaped_worker_cpu_s).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.multiprocessing  # registers torch's reductions: shared-memory tensors travel by handle

from stalerl import forking
from stalerl.guards import STOP_SIGNALS, exit_with
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
    contract). Picklable: it travels to the child as a Process argument.

    The two sides wake each other through pipes, not a multiprocessing Condition: a Condition's
    notify waits until every process sleeping on it has woken, so a worker killed while it waited
    for weights (SIGKILL, out of memory) left the learner waiting forever. A pipe's wake-up waits for
    nobody, and the learner never blocks on the worker for more than a second without checking that
    it is alive."""

    def __init__(self, state_dict: dict[str, torch.Tensor], version: int, deliver_every_version: bool,
                 context: Any):  # a multiprocessing context: its Lock, Values and Pipes are shared with the child
        self.buffers = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        for tensor in self.buffers.values():
            if tensor.device.type == "cpu":
                tensor.share_memory_()  # CUDA tensors travel by IPC handle
        self.on_gpu = any(tensor.is_cuda for tensor in self.buffers.values())
        self.deliver_every_version = deliver_every_version
        self._lock = context.Lock()  # held while the buffers are written or read, and the slot changed
        self._slot = context.Value("q", version, lock=False)  # staged: the child's first load
        self._closed = context.Value("b", 0, lock=False)
        self._to_worker, self._wake_worker = _wake_up_pipe(context)  # a version was staged, or closed
        self._to_learner, self._wake_learner = _wake_up_pipe(context)  # the slot was emptied, or closed

    def publish(self, state_dict: dict[str, torch.Tensor], version: int, worker_alive: Callable[[], bool]) -> None:
        """Stages theta_version; in exact mode, once the worker has taken the version before it. A worker
        that died meanwhile (killed, out of memory) is reported instead of waited for forever."""
        while True:
            _drain(self._to_learner)  # before the check: a wake-up sent after it is not lost
            with self._locked(worker_alive):
                if self._closed.value:
                    return
                if not self.deliver_every_version or self._slot.value == _EMPTY:
                    for name, tensor in state_dict.items():
                        self.buffers[name].copy_(tensor.detach())
                    if self.on_gpu:
                        torch.cuda.synchronize()  # the child reads on its own stream, in its own process
                    self._slot.value = version
                    _wake(self._wake_worker)
                    return
            if not self._to_learner.poll(1.0) and not worker_alive():
                raise WorkerLost("rollout worker process exited before taking the learner's weights")

    @contextlib.contextmanager
    def _locked(self, worker_alive: Callable[[], bool]) -> Iterator[None]:
        while not self._lock.acquire(timeout=1.0):
            if not worker_alive():  # it died holding the lock, which stays held
                raise WorkerLost("rollout worker process exited while it loaded the learner's weights")
        try:
            yield
        finally:
            self._lock.release()

    def load_into(self, engine: RolloutEngine, min_version: int, block: bool) -> None:
        """Loads the staged weights into the child's engine if their version is >= min_version;
        under the lock, since the learner may stage a newer version into the same buffers. (If the
        learner dies, exit_with ends this process: it need not watch for that.)"""
        while True:
            _drain(self._to_worker)
            with self._lock:
                if self._closed.value:
                    raise MailboxClosed
                if self._slot.value >= min_version:
                    engine.load_weights(self.buffers, self._slot.value)
                    self._slot.value = _EMPTY
                    _wake(self._wake_learner)
                    return
            if not block:
                return
            self._to_worker.poll(None)

    def close(self) -> None:
        """Never waits: the other side may be gone (with the lock). Each side checks the flag once woken."""
        self._closed.value = 1
        _wake(self._wake_worker)
        _wake(self._wake_learner)


def _wake_up_pipe(context: Any) -> tuple[Any, Any]:
    """(read end, write end) of a pipe whose writes never block: a full pipe has wake-ups enough."""
    read_end, write_end = context.Pipe(duplex=False)
    os.set_blocking(write_end.fileno(), False)  # the open file's flag: the child's copy shares it
    return read_end, write_end


def _wake(write_end: Any) -> None:
    with contextlib.suppress(BlockingIOError):
        write_end.send_bytes(b"")


def _drain(read_end: Any) -> None:
    while read_end.poll(0):
        read_end.recv_bytes()


def _picklable(item: object) -> bytes:
    try:
        return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle still reaches the learner, as text
        error = item.error if isinstance(item, WorkerFailure) else item
        return pickle.dumps(WorkerFailure(RuntimeError(f"{error!r} (not picklable)")))


def _worker_main(config_data: dict[str, Any], mailbox: SharedWeightMailbox, batches, stop, first_batch: int,
                 learner_pid: int, environment: dict[str, str], cpu_s: Any) -> None:
    """The child: builds its rollout worker, then produce_batches until done, stopped or closed."""
    forking.adopt_environment(environment)  # a forked child has the fork server's
    # Ctrl-C and SIGTERM are the learner's to handle: it finishes its step, checkpoints (in exact mode
    # with batches this worker still makes) and closes this. So a SIGTERM sent to every process of
    # the job (a scheduler's, `docker stop`) stops the run as one sent to the learner does.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    forking.take_stop_signals()  # a forked child starts with them blocked
    exit_with(learner_pid, "stalerl-follow-learner")
    from stalerl.config import TrainConfig, from_dict
    from stalerl.train import build_rollout_worker_from_config

    def put(item: object) -> None:
        cpu_s.value = time.process_time()  # before the learner can read the batch (and then this)
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
    cpu_s.value = time.process_time()
    if stop.is_set():  # the learner reads nothing more: exit without waiting to flush unread batches
        batches.cancel_join_thread()


class ProcessRollouts(QueuedRollouts):
    """Local runtime: one rollout worker process, up to S steps ahead of the learner (module doc)."""

    def __init__(self, config: TrainConfig, initial_weights: dict[str, torch.Tensor], start: PipelineState | None = None):
        """`initial_weights`: the learner's theta_0, or theta_{start.version} when resuming from `start`."""
        mode: Mode = config.staleness.mode
        context = forking.context()  # a fresh process, no inherited threads: forked on CPU, else spawned
        self._forked = context.get_start_method() == "forkserver"
        self._mailbox = SharedWeightMailbox(initial_weights, start.version if start else 0,
                                            deliver_every_version=(mode == "exact"), context=context)
        super().__init__(mode, config.staleness.staleness, config.steps, start)
        self._batches = context.Queue()
        self._stop = context.Event()
        self._cpu_s = context.Value("d", 0.0, lock=False)  # the child's CPU time, as it last reported it
        self._process = context.Process(
            target=_worker_main, name="stalerl-rollout-worker", daemon=True,
            args=(config.to_dict(), self._mailbox, self._batches, self._stop, self._first_batch, os.getpid(),
                  dict(os.environ), self._cpu_s))
        self._process.start()

    def unreaped_worker_cpu_s(self) -> float:
        """The worker's CPU time that RUSAGE_CHILDREN does not hold: all of a forked worker's (the fork
        server's child), and a spawned worker's until this process has waited for it."""
        reaped = not self._forked and self._process.exitcode is not None
        return 0.0 if reaped else self._cpu_s.value

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
        # A child that made every batch before the stop waits at exit to flush the ones not read (a run
        # that ended early: collapse.stop_early, a guard): they are read and dropped here meanwhile.
        deadline = time.monotonic() + 10  # a batch in production is discarded, not awaited past this
        while self._process.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                self._batches.get(timeout=0.1)
        if self._process.is_alive():  # it ignores SIGTERM (_worker_main)
            self._process.kill()
            self._process.join()
        self._batches.close()
        self._batches.cancel_join_thread()
        if self._mailbox.on_gpu:  # the child has let go of the buffers: free what CUDA IPC still holds for it
            torch.cuda.ipc_collect()

    def report(self) -> dict:
        return {"runtime": "local", "worker": "process", "num_workers": 1, "lost_batches": 0,
                "started": "forked" if self._forked else "spawned", "worker_cpu_s": self._cpu_s.value}
