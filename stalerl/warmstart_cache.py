"""Where the warm start (warmstart.py) is cached and under which key: everything that determines it.

Apart from warmstart.py, which imports torch and transformers, so that a process can ask whether the
warm start is made before it imports them (ray_runtime.LearnerActor).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from stalerl.config import TrainConfig

CACHE_FORMAT = 1  # bump when the warm start's recipe changes, so old cache entries are not reused


def cache_root() -> Path:
    return Path(os.environ.get("STALERL_CACHE", Path.home() / ".cache" / "stalerl"))


# The config fields that determine the warm start; others (a checkpoint path, reward options) do not.
MODEL_KEY_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "max_positions")
TASK_KEY_FIELDS = ("name", "max_operand")
# The warm start never trains on the first this-many prompts of the validation order. A run's
# validation split (the first task.val_size of that order, 256 by default) lies within them, so runs
# that differ only in a val_size up to this share one warm start, and none validates on a prompt it
# was trained on. (Each val_size had a warm start of its own: 20-30 s each on a 2-core CPU.)
HELD_OUT_PROMPTS = 256


def warm_start_held_out(config: TrainConfig) -> int:
    """How many prompts, first in the validation order, the warm start holds out (of a small task's
    pairs, a quarter at most, so that it keeps most of them to train on)."""
    pairs = (config.task.max_operand + 1) ** 2
    return max(config.task.val_size, min(HELD_OUT_PROMPTS, pairs // 4))


def warm_start_key(config: TrainConfig) -> str:
    model, task = asdict(config.model), asdict(config.task)
    task_inputs = {k: task[k] for k in TASK_KEY_FIELDS} | {"val_size": warm_start_held_out(config)}
    inputs = {"format": CACHE_FORMAT, "model": {k: model[k] for k in MODEL_KEY_FIELDS},
              "task": task_inputs, "warm_start": asdict(config.warm_start)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def is_cached(config: TrainConfig) -> bool:
    """Whether the warm start of `config` is in the cache (it may still be damaged: warmstart.py checks)."""
    return (cache_root() / f"warmstart-{warm_start_key(config)}").is_dir()
