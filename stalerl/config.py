"""Typed run configuration: frozen dataclasses, loaded from YAML, validated once before any work.

A config serialises to plain data (``to_dict``) so that a sweep is a list of configs and a run
directory's ``config.yaml`` is enough to reproduce it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key or file at fault."""


@dataclass(frozen=True)
class ModelConfig:
    """The embedded default: a tiny Llama-architecture LM built from transformers' own classes."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 64


@dataclass(frozen=True)
class TaskConfig:
    """The built-in verifiable task: small-number addition, prompt ``37+5=``, answer ``42<eos>``."""

    name: Literal["addition"] = "addition"
    max_operand: int = 49  # operands are drawn from 0..max_operand
    val_size: int = 256  # held-out prompts, disjoint from the train split


@dataclass(frozen=True)
class WarmStartConfig:
    """Short supervised phase that brings the random model to low but non-zero accuracy.

    Its result is cached (keyed by everything that determines it), so runs and tests reuse it.
    """

    steps: int = 200  # about 25% greedy, 15% sampled accuracy on the held-out split (default model)
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 16  # P prompts a step
    group_size: int = 8  # G samples per prompt; GRPO advantages are normalised within a group
    max_new_tokens: int = 6
    temperature: float = 1.0


@dataclass(frozen=True)
class LossConfig:
    """The GRPO surrogate with an explicit behavior policy (science.md, 'The surrogate')."""

    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ... and above at 1 + eps_high (DAPO-style clip-higher when larger)
    scale_by_std: bool = True  # False: Dr. GRPO advantages R - mean(R), no std division
    aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    constant_normalizer: float = 0.0  # for 'constant': divide the token sum by this (0: max_new_tokens * batch)
    kl_beta: float = 0.0  # weight of the k3 KL to the starting policy; 0 keeps no reference model


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass(frozen=True)
class StalenessConfig:
    """How old the rollouts the learner trains on may be (science.md, 'Objects')."""

    mode: Literal["exact", "bounded"] = "exact"
    # exact: step t trains on rollouts sampled from theta_{t-S}; bounded: every sample has lag in [0, S].
    staleness: int = 0  # S; 0 is synchronous on-policy GRPO


@dataclass(frozen=True)
class CollapseConfig:
    """Collapse: the moving average of train reward stays below `threshold` for the rest of the run."""

    window: int = 10  # trailing moving-average window, in steps
    threshold: float = 0.02
    min_tail: int = 10  # a below-threshold stretch must last this many steps (or reach the end) to count


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    seed: int = 0
    out: str = ""  # run directory; empty: runs/train-<date>-<time>
    val_every: int = 10  # validation on the held-out split every N steps (and at the first and last)
    # torch intra-op threads for this process; 0 keeps torch's default. 1 suits the tiny model: the
    # rollout thread and the learner thread then each get a core (benchmarks/async_speed.py).
    threads: int = 1
    tensorboard: bool = True
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading from plain data


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Checks one leaf against its annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _check_value(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {annotation}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from nested plain data, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = from_dict(annotation, value, f"{prefix}{name}.")
        else:
            values[name] = _check_value(value, annotation, f"{prefix}{name}")
    return cls(**values)


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        return validate(from_dict(TrainConfig, data or {}))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def override(config: TrainConfig, dotted: dict[str, Any]) -> TrainConfig:
    """Returns `config` with dotted keys (``optim.lr``) replaced, type-checked like a file."""
    data = config.to_dict()
    for key, value in dotted.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown key '{key}'")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown key '{key}'")
        node[leaf] = value
    return from_dict(TrainConfig, data)


def validate(config: TrainConfig) -> TrainConfig:
    """Every check that can be made before work starts; raises ConfigError naming the key."""
    checks = [
        (config.steps >= 1, "steps", "must be >= 1"),
        (config.val_every >= 1, "val_every", "must be >= 1"),
        (config.threads >= 0, "threads", "must be >= 0"),
        (config.staleness.staleness >= 0, "staleness.staleness", "S must be >= 0"),
        (config.optim.lr > 0, "optim.lr", "learning rate must be > 0"),
        (config.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0"),
        (0 <= config.optim.beta1 < 1 and 0 <= config.optim.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)"),
        (config.rollout.group_size >= 2, "rollout.group_size", "GRPO needs at least 2 samples per group"),
        (config.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1"),
        (config.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1"),
        (config.rollout.temperature > 0, "rollout.temperature", "must be > 0"),
        (0 <= config.loss.eps_low < 1, "loss.eps_low", "must be in [0, 1)"),
        (config.loss.eps_high >= 0, "loss.eps_high", "must be >= 0"),
        (config.loss.kl_beta >= 0, "loss.kl_beta", "must be >= 0"),
        (config.loss.constant_normalizer >= 0, "loss.constant_normalizer", "must be >= 0"),
        (config.task.max_operand >= 1, "task.max_operand", "must be >= 1"),
        (config.task.val_size >= 1, "task.val_size", "must be >= 1"),
        (config.warm_start.steps >= 0, "warm_start.steps", "must be >= 0"),
        (config.warm_start.lr > 0, "warm_start.lr", "must be > 0"),
        (config.model.hidden_size % config.model.num_heads == 0, "model.hidden_size",
         "must be divisible by model.num_heads"),
        (config.collapse.window >= 1, "collapse.window", "must be >= 1"),
        (config.collapse.min_tail >= 1, "collapse.min_tail", "must be >= 1"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}")
    pairs = (config.task.max_operand + 1) ** 2
    if config.task.val_size >= pairs // 2:
        raise ConfigError(f"task.val_size: {config.task.val_size} leaves too few of the {pairs} prompts for training")
    return config


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
