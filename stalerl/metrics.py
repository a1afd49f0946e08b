"""What the learner logs: update geometry (Grad CosSim, drift) and the run's metrics files."""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Any

import torch

# Within-cycle drift ||theta_t - theta_{t-S}|| needs the last S parameter vectors; keep them only
# while they are small (the embedded model), never for a billion-parameter checkpoint.
MAX_CYCLE_HISTORY_FLOATS = 64_000_000


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


class UpdateTracker:
    """Measures each update d_t = theta_{t+1} - theta_t against the previous one and theta_0."""

    def __init__(self, model: torch.nn.Module, staleness: int):
        self.theta_0 = flat_parameters(model)
        self.previous = self.theta_0.clone()
        self.previous_update: torch.Tensor | None = None
        self.path_length = 0.0  # sum of ||d_k||: the cumulative learner drift T * eta * G_upd
        keep_history = 0 < staleness and staleness * self.theta_0.numel() <= MAX_CYCLE_HISTORY_FLOATS
        self.history: deque[torch.Tensor] | None = deque(maxlen=staleness) if keep_history else None
        if self.history is not None:
            self.history.append(self.theta_0)

    def after_step(self, model: torch.nn.Module) -> dict[str, float | None]:
        current = flat_parameters(model)
        update = current - self.previous
        update_norm = float(update.norm())
        cos_sim = None
        if self.previous_update is not None:
            denominator = update_norm * float(self.previous_update.norm())
            cos_sim = float(update @ self.previous_update) / denominator if denominator > 0 else 0.0
            cos_sim = min(1.0, max(-1.0, cos_sim))  # rounding can step just outside [-1, 1]
        cycle_drift = None
        if self.history is not None:
            cycle_drift = float((current - self.history[0]).norm())  # history[0] is theta_{t+1-S}
            self.history.append(current)
        self.previous, self.previous_update = current, update
        self.path_length += update_norm
        return {
            "grad_cos_sim": cos_sim,
            "update_norm": update_norm,
            "drift": float((current - self.theta_0).norm()),
            "path_length": self.path_length,
            "cycle_drift": cycle_drift,
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, plain data) for a checkpoint; `restore` takes them back."""
        tensors = {"theta_0": self.theta_0, "previous": self.previous}
        if self.previous_update is not None:
            tensors["previous_update"] = self.previous_update
        for index, theta in enumerate(self.history or []):
            tensors[f"history.{index}"] = theta
        return tensors, {"path_length": self.path_length, "history": len(self.history or [])}

    def restore(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        self.theta_0, self.previous = tensors["theta_0"], tensors["previous"]
        self.previous_update = tensors.get("previous_update")
        self.path_length = data["path_length"]
        if self.history is not None:
            self.history.clear()
            self.history.extend(tensors[f"history.{index}"] for index in range(data["history"]))


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """One JSON line a step in metrics.jsonl, per-sample lags in samples.jsonl, TensorBoard scalars
    when asked. Append-only and line-atomic: each line is one unbuffered write call, so a killed run
    keeps every finished step and at worst a truncated last line (read_metrics skips it).
    `purge_step`: a resumed run's first step; TensorBoard hides its older events from there on."""

    def __init__(self, run_dir: Path, tensorboard: bool, purge_step: int | None = None):
        self.metrics_file = open(run_dir / "metrics.jsonl", "ab", buffering=0)
        self.samples_file = open(run_dir / "samples.jsonl", "ab", buffering=0)
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def write(self, metrics: dict[str, Any], samples: dict[str, Any]) -> None:
        self.metrics_file.write((json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n").encode())
        self.samples_file.write((json.dumps(samples) + "\n").encode())
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(key, value, metrics["step"])

    def position(self) -> dict[str, int]:
        """Byte offsets after the last line written: a checkpoint's view of the outputs."""
        return {"metrics.jsonl": self.metrics_file.tell(), "samples.jsonl": self.samples_file.tell()}

    def close(self) -> None:
        self.metrics_file.close()
        self.samples_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Reads metrics.jsonl, tolerating a truncated last line from a killed run."""
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number}: malformed metrics line") from None
    return rows
