"""Validation during a run, and the metrics rows that wait for it.

Every val_every steps and at the last, the weights just published (theta_{t+1}) are scored on the
held-out prompts: greedy, one completion each (warmstart.accuracy). With `val_in_background` (the
default) that runs on a copy of the weights in a thread of its own while the learner goes on: on
the learner's path it took about a tenth of a run at S >= 1, where the next batch is ready at once
(README, Performance). The rows of the steps since then are held until the score is in and are
written in step order, so metrics.jsonl, TensorBoard and W&B read as before. A checkpoint (and so
a stop by Ctrl-C or SIGTERM) and the run's end wait for the score and write them first; a run that
fails writes them at once, the running score left out, and then lets that validation finish: a
process that exits while a thread is inside torch aborts (exit code 134 instead of the run's own,
as a stop on non-finite updates showed). One validation runs at a time, and one
that raises (a reward under task.on_reward_error=stop) raises in the learner's thread at the next
validation, checkpoint or end.
"""

from __future__ import annotations

import contextlib
import copy
import threading
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
        self.background = background
        self.latest: float | None = None  # the newest score in: the progress bar's
        self._queued: list[tuple[dict[str, Any], dict[str, Any]]] = []  # rows behind the running validation
        self._running: threading.Thread | None = None
        self._outcome: list[Any] = []  # the running validation's score, or the exception it raised
        # In the background, a copy of the weights: the learner updates its own meanwhile.
        self.engine = make_engine(copy.deepcopy(model).requires_grad_(False) if background else model)

    def score_now(self, version: int) -> float:
        """The score of the learner's weights, theta_version, here and now (before the first step)."""
        return accuracy(self._loaded(version), self.task, self.prompts, noise_seed=None)

    def write(self, metrics: dict[str, Any], samples: dict[str, Any], validate: bool) -> None:
        """The step's row; with `validate`, its val_reward is the score of the weights just published."""
        if validate:
            self.flush()  # one validation at a time: the one before is written first
            if self.background:
                engine = self._loaded(metrics["step"] + 1)
                self._running = threading.Thread(target=self._score, args=(engine, metrics), daemon=True,
                                                 name="stalerl-validation")
                self._running.start()
            else:
                metrics["val_reward"] = self.latest = self.score_now(metrics["step"] + 1)
        self._queued.append((metrics, samples))
        if self._running is None or not self._running.is_alive():
            self.flush()

    def flush(self) -> None:
        """Waits for the running validation, if any, and writes every row held for it."""
        running, self._running = self._running, None
        if running is not None:
            running.join()
            outcome = self._outcome.pop()
            if isinstance(outcome, BaseException):
                self._write_held()  # its row without a score, the others as they are
                raise outcome
        self._write_held()

    def close(self) -> None:
        """After an error (a stop, a failed reward): the held rows now, without the running score; then
        that validation is let finish (its score, or its error, dropped) so that the process can exit."""
        with contextlib.suppress(OSError):  # a full disk is the error being reported
            self._write_held()
        running, self._running = self._running, None
        if running is not None:
            running.join()

    def _score(self, engine: TransformersEngine, metrics: dict[str, Any]) -> None:
        try:
            metrics["val_reward"] = self.latest = accuracy(engine, self.task, self.prompts, noise_seed=None)
            self._outcome.append(metrics["val_reward"])
        except BaseException as error:  # raised again by flush, in the learner's thread
            self._outcome.append(error)

    def _loaded(self, version: int) -> TransformersEngine:
        if self.background:
            self.engine.load_weights(self.model.state_dict(), version)  # a copy: the learner goes on meanwhile
        return self.engine

    def _write_held(self) -> None:
        while self._queued:
            self.writer.write(*self._queued[0])  # a row leaves the queue once it is written
            self._queued.pop(0)
