"""The warm start: a short supervised phase on the train split, cached on disk by its inputs.

GRPO needs some reward signal: a random model never produces a correct sum, so every group's
advantages would be zero. A few hundred supervised steps bring it to low but non-zero accuracy.
The result is an ordinary Hugging Face checkpoint in the cache, keyed by a hash of everything
that determines it, so runs and tests build it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stalerl.config import ConfigError, TrainConfig
from stalerl.model import (build_char_tokenizer, build_tiny_llama, count_parameters, load_checkpoint,
                           quiet_progress_bars)
from stalerl.rollout import TransformersEngine
from stalerl.tasks import AdditionTask, Prompt, Task

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


def supervised_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos>prompt answer<eos>`` rows; labels only on the answer and end-of-sequence."""
    rows, label_rows = [], []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt.text).input_ids
        answer_ids = tokenizer(prompt.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(row) for row in rows)
    input_ids_B_T = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels_B_T = torch.full((len(rows), width), -100)
    for i, (row, labels) in enumerate(zip(rows, label_rows)):
        input_ids_B_T[i, : len(row)] = torch.tensor(row)
        labels_B_T[i, : len(labels)] = torch.tensor(labels)
    return input_ids_B_T, (input_ids_B_T != tokenizer.pad_token_id).long(), labels_B_T


def supervised_train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
                     steps: int, lr: float, batch_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        input_ids, attention_mask, labels = supervised_batch(tokenizer, task.sample_prompts(rng, batch_size))
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def accuracy(engine: TransformersEngine, task: Task, prompts: list[Prompt], noise_seed: int | None) -> float:
    """Mean reward over `prompts`: greedy with noise_seed=None, one sample each otherwise."""
    generation = engine.generate([p.text for p in prompts], noise_seed)
    rewards = [task.reward(p, c, bool(f)) for p, c, f in zip(prompts, generation.completions, generation.finished_N)]
    return float(np.mean(np.nan_to_num(rewards, nan=0.0)))  # a failed reward (NaN, rewards.py) scores 0 here


def warm_started_policy(config: TrainConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """The warm-started model, tokenizer and a record of how good it is; built once, then cached.

    A cache entry that does not load (a truncated model.safetensors, a file deleted by hand) is
    removed and built again, with a one-line warning: the cache holds nothing that cannot be remade.
    """
    path = cache_root() / f"warmstart-{warm_start_key(config)}"
    with quiet_progress_bars():  # per-shard bars are noise for a 1M-parameter model
        loaded = _load(path)
        if loaded is None:
            # One process builds it; others that need it now (a sweep's cells, Ray's actors) wait for it.
            with _build_lock(path):
                loaded = _load(path)  # built while this one waited
                if loaded is None:
                    _build(config, path)
                    loaded = _load(path)
            if loaded is None:
                raise RuntimeError(f"the warm start just built in {path} does not load; see the warning above")
    return loaded


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Held while the entry at `path` is built; an unwritable cache is one line, before any training."""
    lock = FileLock(path.parent / f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as error:
        raise _unwritable(path.parent, error) from None
    try:
        yield
    finally:
        lock.release()


def _unwritable(cache: Path, error: OSError) -> ConfigError:
    return ConfigError(f"cannot write the warm-start cache {cache} ({error.strerror or error}); "
                       f"set STALERL_CACHE to a writable directory")


def _load(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict] | None:
    """The cache entry at `path`, or None when there is none; a damaged entry is removed (and None)."""
    if not path.exists():
        return None
    try:
        record = json.loads((path / "warm_start.json").read_text())
        model, tokenizer = load_checkpoint(path)
    except Exception as error:  # SafetensorError, OSError, JSONDecodeError...: whatever it is, rebuild
        why = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"stalerl: warning: warm-start cache entry {path} is unusable ({type(error).__name__}: {why}); "
              f"building it again", file=sys.stderr)
        _discard(path)
        return None
    return model, tokenizer, record


def _discard(path: Path) -> None:
    # Renamed away first, so that a process starting now sees no entry rather than half of one.
    trash = path.parent / f".broken-{path.name}-{os.getpid()}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    except OSError as error:
        raise ConfigError(f"warm-start cache entry {path} is unusable and cannot be removed "
                          f"({error.strerror or error}); delete it") from None
    shutil.rmtree(trash, ignore_errors=True)


def _build(config: TrainConfig, path: Path) -> None:
    # Written to a temporary directory and renamed, so a killed build never leaves a half entry. The
    # directory is made first: an unwritable cache is one line before the training, not after it.
    try:
        staging = Path(tempfile.mkdtemp(prefix=".warmstart-", dir=path.parent))  # the lock made path.parent
    except OSError as error:
        raise _unwritable(path.parent, error) from None
    try:
        warm = config.warm_start
        task = AdditionTask(config.task.max_operand, warm_start_held_out(config))  # validates on the held-out
        tokenizer = build_char_tokenizer(AdditionTask.alphabet())
        model = build_tiny_llama(config.model, len(tokenizer), seed=warm.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(warm.seed)
            supervised_train(model, tokenizer, task, warm.steps, warm.lr, warm.batch_size, warm.seed)
        engine = TransformersEngine(model, tokenizer, config.rollout.max_new_tokens)
        record = {
            "parameters": count_parameters(model),
            "steps": warm.steps,
            "val_greedy_accuracy": accuracy(engine, task, task.validation_prompts(), None),
            "val_sampled_accuracy": accuracy(engine, task, task.validation_prompts(), noise_seed=warm.seed),
        }
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "warm_start.json").write_text(json.dumps(record, indent=2))
        try:
            os.rename(staging, path)
        except OSError:  # another process finished the same entry first
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
