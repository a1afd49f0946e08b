"""Tasks: prompts plus a verifiable reward. The built-in one is small-number addition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np


@dataclass(frozen=True)
class Prompt:
    text: str  # what the model is conditioned on, e.g. "37+5="
    answer: str  # the reference the reward checks against, e.g. "42"
    # The dataset record it came from (question, answer, any other field); user rewards get it.
    record: Mapping[str, Any] | None = field(default=None, compare=False)


class Task(Protocol):
    """A task = a train split to sample prompts from, a held-out split, and a reward."""

    def sample_prompts(self, rng: np.random.Generator, count: int) -> list[Prompt]: ...

    def validation_prompts(self) -> list[Prompt]: ...

    def reward(self, prompt: Prompt, completion: str, finished: bool) -> float: ...


class AdditionTask:
    """``a+b=`` with a, b in 0..max_operand; reward 1 for the exact sum followed by end-of-sequence.

    The held-out split is a fixed random subset of the (a, b) pairs, disjoint from the train split.
    """

    def __init__(self, max_operand: int, val_size: int, split_seed: int = 1234):
        pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        order = np.random.default_rng(split_seed).permutation(len(pairs))
        self.val = [self._prompt(*pairs[i]) for i in order[:val_size]]
        self.train = [self._prompt(*pairs[i]) for i in order[val_size:]]

    @staticmethod
    def _prompt(a: int, b: int) -> Prompt:
        return Prompt(text=f"{a}+{b}=", answer=str(a + b))

    @staticmethod
    def alphabet() -> str:
        return "0123456789+="

    def sample_prompts(self, rng: np.random.Generator, count: int) -> list[Prompt]:
        return [self.train[i] for i in rng.integers(0, len(self.train), size=count)]

    def validation_prompts(self) -> list[Prompt]:
        return self.val

    def reward(self, prompt: Prompt, completion: str, finished: bool) -> float:
        return float(finished and completion == prompt.answer)
