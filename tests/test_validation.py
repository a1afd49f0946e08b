"""Validation in a thread of its own (validation.py): rows wait for their score and keep their order."""

import threading

import pytest
import torch

from stalerl.config import TrainConfig
from stalerl.metrics import MetricsWriter, read_metrics
from stalerl.policy import build_policy
from stalerl.rollout import TransformersEngine
from stalerl.tasks import AdditionTask
from stalerl.train import validates_in_background
from stalerl.validation import Validation


class GatedTask(AdditionTask):
    """The addition task whose reward waits, while `gate` is closed, once `closed` is set."""

    def __init__(self):
        super().__init__(max_operand=49, val_size=16)
        self.gate, self.closed = threading.Event(), False

    def reward(self, prompt, completion, finished):
        if self.closed:
            self.gate.wait(timeout=60)
        return super().reward(prompt, completion, finished)


def row(step):
    return {"step": step, "train_reward": 0.5, "val_reward": None}, {"step": step, "sample_ids": [], "versions": [],
                                                                       "rewards": []}


def test_rows_wait_for_their_validation_and_are_written_in_order(tmp_path):
    model, tokenizer, _ = build_policy(TrainConfig())
    task = GatedTask()
    writer = MetricsWriter(tmp_path, tensorboard=False)
    validation = Validation(model, lambda policy: TransformersEngine(policy, tokenizer, 6), task,
                            task.validation_prompts(), writer, background=True)
    initial = validation.score_now(version=0)
    inline = Validation(model, lambda policy: TransformersEngine(policy, tokenizer, 6), task, task.validation_prompts(),
                        writer, background=False).score_now(version=0)
    assert initial == inline  # a copy of the same weights: the same greedy completions

    validation.write(*row(0), validate=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0]  # nothing to wait for
    task.closed = True
    validation.write(*row(1), validate=True)  # scores the weights as they are now, in its thread
    next(model.parameters()).data.add_(1.0)  # the learner goes on (the validation scores the copy made at write)
    validation.write(*row(2), validate=False)
    validation.write(*row(3), validate=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0]  # held behind step 1's score

    task.gate.set()
    validation.flush()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["val_reward"] for r in rows] == [None, initial, None, None] and validation.latest == initial
    validation.close()
    writer.close()


def test_a_failing_run_writes_the_held_rows_at_once_and_lets_the_running_validation_end(tmp_path):
    """close() after an error: the rows are written without the running score, and close returns only
    once that validation has ended (a process that exits while a thread is in torch aborts: exit 134)."""
    model, tokenizer, _ = build_policy(TrainConfig())
    task = GatedTask()
    writer = MetricsWriter(tmp_path, tensorboard=False)
    validation = Validation(model, lambda policy: TransformersEngine(policy, tokenizer, 6), task,
                            task.validation_prompts(), writer, background=True)
    task.closed = True
    validation.write(*row(0), validate=True)
    validation.write(*row(1), validate=False)
    running = validation._running
    threading.Timer(0.3, task.gate.set).start()  # the validation can end only after close() has begun
    validation.close()
    assert not running.is_alive()
    assert [(r["step"], r["val_reward"]) for r in read_metrics(tmp_path)] == [(0, None), (1, None)]
    writer.close()


class FailingTask(AdditionTask):
    def reward(self, prompt, completion, finished):
        raise ValueError("reward failed")


def test_a_validation_that_raises_says_so_in_the_learners_thread_and_no_row_is_lost(tmp_path):
    model, tokenizer, _ = build_policy(TrainConfig())
    task = FailingTask(max_operand=49, val_size=16)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    validation = Validation(model, lambda policy: TransformersEngine(policy, tokenizer, 6), task,
                            task.validation_prompts(), writer, background=True)
    validation.write(*row(0), validate=True)
    validation.write(*row(1), validate=False)
    with pytest.raises(ValueError, match="reward failed"):
        validation.flush()
    assert [(r["step"], r["val_reward"]) for r in read_metrics(tmp_path)] == [(0, None), (1, None)]
    writer.close()


def test_in_the_background_by_default_on_cpu_and_as_asked_otherwise():
    model = torch.nn.Linear(2, 2)  # on CPU
    assert validates_in_background(TrainConfig(), model)
    assert not validates_in_background(TrainConfig(val_in_background=False), model)
    if torch.cuda.is_available():
        assert not validates_in_background(TrainConfig(), model.cuda())  # a GPU: only when asked
