"""How much of each measurement `stalerl bench` runs (its presets), and the config it times."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stalerl.config import TrainConfig, override, validate

WARMUP_STEPS = 3  # allocator and cache warm-up: not timed


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to run; `quick` and `full` are the two presets."""

    repeats: int
    step_steps: int  # steps per run in the stalerl-vs-TRL comparison (the first WARMUP_STEPS are not timed)
    gen_calls: int  # timed generate calls per engine and repeat
    async_steps: int
    async_staleness: tuple[int, ...]
    sweep_cells: int  # the first N cells of S {0,1,2,4} x lr {1e-4, 3e-4, 1e-3}
    sweep_steps: int
    memory_staleness: tuple[int, ...]
    memory_prompts: tuple[int, ...]
    # The async runs again with the rollout worker in a process of its own (runtime.local_worker).
    async_process: bool = True
    # A wider embedded Llama for the memory runs, so that a copy of the weights stands out of the
    # interpreter's ~0.5 GB; its warm start is one step (the reward does not matter for memory).
    memory_model: dict = dataclasses.field(default_factory=lambda: {
        "model.hidden_size": 512, "model.intermediate_size": 1536, "model.num_layers": 4, "warm_start.steps": 1})


# quick: a smoke test of every part (its figures are not measurements): 4 sweep cells, not 12.
QUICK = Plan(repeats=1, step_steps=6, gen_calls=3, async_steps=8, async_staleness=(1, 2, 4), sweep_cells=4,
             sweep_steps=2, memory_staleness=(0, 4), memory_prompts=(16, 64))
FULL = Plan(repeats=3, step_steps=25, gen_calls=10, async_steps=50, async_staleness=(1, 2, 4), sweep_cells=12,
            sweep_steps=40, memory_staleness=(0, 1, 4, 16), memory_prompts=(16, 32, 64))
# A checkpoint (--model): only gen and async run, and a 1B model's step takes seconds, not 0.1 s.
CHECKPOINT = dataclasses.replace(FULL, repeats=1, gen_calls=3, async_steps=8, async_staleness=(1, 2))
CHECKPOINT_QUICK = dataclasses.replace(QUICK, gen_calls=1, async_steps=5, async_staleness=(1,))
CHECKPOINT_PARTS = ("gen", "async")
# The math task on a checkpoint: a GSM8K-like batch of P x G = 64 sequences, 128 new tokens each.
# A few validation prompts only: train() scores them once before the first step.
CHECKPOINT_DEFAULTS = {"task.name": "math", "task.val_size": 8, "rollout.prompts_per_step": 8,
                       "rollout.max_new_tokens": 128}


def base_config(**changes: Any) -> TrainConfig:
    """The embedded default as the bench times it: no validation (but the first and the last, on the
    learner's path: no validator copy in the memory figures), TensorBoard, progress bar or checkpoints."""
    values = {"val_every": 10**9, "val_in_background": False, "progress": False, "tensorboard": False, "threads": 1,
              "checkpoint.every": 0}
    return validate(override(TrainConfig(), values | changes))


def default_plan(quick: bool, checkpoint: bool) -> Plan:
    if checkpoint:
        return CHECKPOINT_QUICK if quick else CHECKPOINT
    return QUICK if quick else FULL
