"""Validation during a run, and the metrics rows that wait for it.

Every val_every steps and at the last, the weights just published (theta_{t+1}) are scored on the
held-out prompts: greedy, one completion each (warmstart.accuracy). With `val_in_background` (the
default) that runs on a copy of the weights in a thread of its own while the learner goes on: on
the learner's path it took about a tenth of a run at S >= 1, where the next batch is ready at once
(README, Performance). The rows of the steps since then are held until the score is in and are
written in step order, so metrics.jsonl, TensorBoard and W&B read as before. A checkpoint, a stop
and the run's end write them first; one validation runs at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
from typing import Any, Callable

from transformers import PreTrainedModel

from stalerl.metrics import MetricsWriter
from stalerl.rollout import TransformersEngine
from stalerl.tasks import Prompt, Task
from stalerl.warmstart import accuracy


class Validation:
    """Scores the learner's weights on the validation prompts and writes each step's row once its
    score is in. `make_engine(model)`: the engine that generates with `model`."""

    def __init__(self, model: PreTrainedModel, make_engine: Callable[[PreTrainedModel], TransformersEngine],
                 task: Task, prompts: list[Prompt], writer: MetricsWriter, background: bool):
        self.model, self.task, self.prompts, self.writer = model, task, prompts, writer
        self.latest: float | None = None  # the newest score in: the progress bar's
        self._queued: list[tuple[dict[str, Any], dict[str, Any]]] = []  # rows behind the running validation
        self._running: concurrent.futures.Future | None = None
        self._running_row: dict[str, Any] | None = None
        self._pool = None
        if background:  # one more copy of the weights
            self.engine = make_engine(copy.deepcopy(model).requires_grad_(False))
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stalerl-validation")
        else:
            self.engine = make_engine(model)

    def score_now(self, version: int) -> float:
        """The score of the learner's weights, theta_version, here and now (before the first step)."""
        return accuracy(self.engine if self._pool is None else self._loaded(version), self.task, self.prompts,
                        noise_seed=None)

    def write(self, metrics: dict[str, Any], samples: dict[str, Any], validate: bool) -> None:
        """The step's row; with `validate`, its val_reward is the score of the weights just published."""
        if validate:
            self._wait()  # one validation at a time: the one before is written first
            if self._pool is None:
                metrics["val_reward"] = self.latest = self.score_now(metrics["step"] + 1)
            else:
                self._running = self._pool.submit(accuracy, self._loaded(metrics["step"] + 1), self.task, self.prompts,
                                                  None)
                self._running_row = metrics
        self._queued.append((metrics, samples))
        if self._running is None or self._running.done():
            self._wait()

    def flush(self) -> None:
        """Waits for the running validation, if any, and writes every row held for it."""
        self._wait()

    def close(self) -> None:
        """After an error too: writes what it still can (a full disk is the error being reported)."""
        with contextlib.suppress(OSError):
            self._wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _loaded(self, version: int) -> TransformersEngine:
        self.engine.load_weights(self.model.state_dict(), version)  # a copy: the learner goes on meanwhile
        return self.engine

    def _wait(self) -> None:
        try:
            if self._running is not None:
                running, self._running = self._running, None
                self._running_row["val_reward"] = self.latest = running.result()
        finally:  # a validation that raised leaves its row without a score, not unwritten
            while self._queued:
                self.writer.write(*self._queued[0])  # a row is dropped from the queue once it is written
                self._queued.pop(0)
