"""The rollout thread's own CUDA stream (runtime.rollout_cuda_stream: own).

Kernels that two threads queue on one stream run one after the other: on the default stream the
rollout thread's many small decoding kernels wait behind the learner's backward, and the learner
behind them. On a stream of its own the GPU can run them side by side. What one stream ordered for
free then needs saying, at the three places where the two threads hand tensors over:

* weights, learner -> worker: the learner records an event after staging its copy of the weights,
  and the worker's stream waits for it before loading them (staged_copy_ready);
* a batch, worker -> learner: the worker waits for its stream before it hands the batch over, so
  the learner never reads a tensor still being written (finished_on_own_stream);
* a batch's memory: it was allocated on the worker's stream, and torch's caching allocator would
  give it back to that stream as soon as the learner drops it, while the learner's kernels may
  still read it; the learner marks it in use on its own stream (used_on_current_stream).

The price: torch's allocator caches freed GPU memory per stream, so each side reuses only its own,
and the memory held can grow somewhat. None of this runs on a CPU: there every function here is a
no-op or is not called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:  # staleness.py imports this module, and Ray's stub actors import it without transformers
    from stalerl.rollout import RolloutBatch

T = TypeVar("T")


@dataclass(frozen=True)
class CopyReady:
    """An event recorded after the learner's staged copy of the weights, on that copy's device."""

    event: torch.cuda.Event
    device: torch.device

    def wait(self) -> None:
        """Makes the calling thread's current stream on the device wait for the copy."""
        self.event.wait(torch.cuda.current_stream(self.device))


def staged_copy_ready(tensors: Iterable[torch.Tensor]) -> CopyReady | None:
    """An event after the work queued so far on the calling thread's stream, if the tensors are on a GPU."""
    device = next((tensor.device for tensor in tensors if tensor.is_cuda), None)
    if device is None:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return CopyReady(event, device)


def run_on_stream(stream: torch.cuda.Stream | None, target: Callable[..., None], *args: object) -> None:
    """target(*args) with `stream` as this thread's current stream (None: as it is): the rollout
    thread's body."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        target(*args)


def finished_on_own_stream(produce: Callable[[int], T], stream: torch.cuda.Stream) -> Callable[[int], T]:
    """`produce` whose result is handed over only once `stream` has finished making it."""

    def produce_and_wait(batch_index: int) -> T:
        batch = produce(batch_index)
        stream.synchronize()
        return batch

    return produce_and_wait


def used_on_current_stream(batch: RolloutBatch) -> None:
    """Marks the batch's GPU tensors in use on the learner's current stream (see the module doc)."""
    tensors = [value for value in vars(batch.generation).values() if isinstance(value, torch.Tensor)]
    tensors += [batch.rewards_N] + ([batch.valid_N] if batch.valid_N is not None else [])
    for tensor in tensors:
        if tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
