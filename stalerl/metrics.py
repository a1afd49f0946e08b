"""What the learner logs: update geometry (Grad CosSim, drift) and the run's metrics files."""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stalerl.optimizer import master_values

if TYPE_CHECKING:
    from stalerl.wandb_logging import WandbRun

# Within-cycle drift ||theta_t - theta_{t-S}|| needs the last S parameter vectors; keep them only
# while they are small (the embedded model, LoRA adapters), never for a billion-parameter checkpoint.
MAX_CYCLE_HISTORY_FLOATS = 64_000_000


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def lora_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, adapter) for every active peft LoRA adapter: W = W0 + scaling * B @ A."""
    if not hasattr(model, "peft_config"):
        return []
    return [(module, adapter) for module in model.modules()
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
            for adapter in module.active_adapters if adapter in module.lora_A]


@dataclass
class Snapshot:
    """What update geometry needs of a policy: the trainable parameters outside LoRA adapters,
    flattened (fp32 masters where the optimizer keeps them), and each LoRA module's (B, A)."""

    dense: torch.Tensor  # [D]
    factors: list[tuple[torch.Tensor, torch.Tensor]]  # per module: (B [out, r], A [r, in])

    def numel(self) -> int:
        return self.dense.numel() + sum(b.numel() + a.numel() for b, a in self.factors)


@dataclass
class Delta:
    """theta - theta' on the weights the policy uses: the dense part, and per LoRA module the merged
    W - W' = P @ Q (rank 2r, never formed: inner products go through r x r Gram matrices)."""

    dense: torch.Tensor  # [D]
    low_rank: list[tuple[torch.Tensor, torch.Tensor]]  # per module: (P [out, 2r], Q [2r, in]), float64

    def dot(self, other: Delta) -> float:
        total = float(self.dense @ other.dense)
        for (p_1, q_1), (p_2, q_2) in zip(self.low_rank, other.low_rank):
            total += float(((p_1.T @ p_2) * (q_1 @ q_2.T)).sum())  # <P1 Q1, P2 Q2> = tr(P1'P2 Q2 Q1')
        return total

    def norm(self) -> float:
        if not self.low_rank:
            return float(self.dense.norm())
        return math.sqrt(max(self.dot(self), 0.0))


def difference(new: Snapshot, old: Snapshot, scales: list[float]) -> Delta:
    return Delta(new.dense - old.dense, low_rank_difference(new.factors, old.factors, scales))


def low_rank_difference(new: list[tuple[torch.Tensor, torch.Tensor]], old: list[tuple[torch.Tensor, torch.Tensor]],
                        scales: list[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # B1 A1 - B0 A0 = (B1 - B0) A1 + B0 (A1 - A0): factors that are small where the change is, so
    # the Gram products hold no cancellation between large terms.
    return [(torch.cat([b_1 - b_0, b_0], dim=1).double() * scale, torch.cat([a_1, a_1 - a_0], dim=0).double())
            for (b_1, a_1), (b_0, a_0), scale in zip(new, old, scales)]


def flat_into(values: list[torch.Tensor], out: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """Writes cat(values) - minus (or cat(values)) into `out`, tensor by tensor, and returns it: the
    same floats as the flat expression, with no flat copy of the values made (`out` may be `minus`)."""
    offset = 0
    for value in values:
        count = value.numel()
        flat = value.detach().reshape(-1).float()
        part = out[offset : offset + count]
        if minus is None:
            part.copy_(flat)
        else:
            torch.sub(flat, minus[offset : offset + count], out=part)
        offset += count
    return out


class UpdateTracker:
    """Measures each update d_t = theta_{t+1} - theta_t against the previous one and theta_0.

    theta is what the policy computes with: with LoRA, the merged weights W0 + s B A (the frozen
    base cancels), not the adapters' own coordinates. Under MasterWeightAdamW, the fp32 masters.
    """

    def __init__(self, model: torch.nn.Module, staleness: int, optimizer: torch.optim.Optimizer | None = None,
                 on_host: bool = False):
        self.optimizer = optimizer
        lora = lora_modules(model)
        self.scales = [float(module.scaling[adapter]) for module, adapter in lora]
        adapter_weights = {id(w) for module, adapter in lora
                           for w in (module.lora_A[adapter].weight, module.lora_B[adapter].weight)}
        self.dense_parameters = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_weights]
        self.adapters = [(module.lora_B[adapter].weight, module.lora_A[adapter].weight) for module, adapter in lora]
        # runtime.update_geometry=host: the vectors in host memory, where a GPU has no room for them
        # beside the learner; the masters come over once a step, into `staging`.
        self.dense_size = sum(p.numel() for p in self.dense_parameters)
        model_device = self.dense_parameters[0].device if self.dense_parameters else torch.device("cpu")
        self.device = torch.device("cpu") if on_host else model_device
        self.staging = torch.empty(self.dense_size, device=self.device) if on_host else None
        self.theta_0 = self.snapshot()
        self.previous = self.theta_0
        self.previous_update: Delta | None = None
        self.path_length = 0.0  # sum of ||d_k||: the cumulative learner drift T * eta * G_upd
        keep_history = 0 < staleness and staleness * self.theta_0.numel() <= MAX_CYCLE_HISTORY_FLOATS
        self.history: deque[Snapshot] | None = deque(maxlen=staleness) if keep_history else None
        if self.history is not None:
            self.history.append(self.theta_0)

    @property
    def trainable_count(self) -> int:
        return self.theta_0.numel()

    def snapshot(self) -> Snapshot:
        return Snapshot(flat_into(self._values(), torch.empty(self.dense_size, device=self.device)), self._factors())

    def _values(self) -> list[torch.Tensor]:
        """The dense parameters' full-precision values, or with `staging` all of them in one host vector."""
        values = master_values(self.dense_parameters, self.optimizer)
        return values if self.staging is None else [flat_into(values, self.staging)]

    def _factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [tuple(v.detach().float().clone() for v in master_values(pair, self.optimizer))
                for pair in self.adapters]

    def write_dense(self, dense: torch.Tensor) -> None:
        """Sets the dense parameters (and their masters) to `dense`; the stabilizer GAC uses it."""
        offset = 0
        masters = master_values(self.dense_parameters, self.optimizer)
        with torch.no_grad():
            for parameter, master in zip(self.dense_parameters, masters):
                values = dense[offset : offset + parameter.numel()].view_as(parameter)
                master.copy_(values)
                if master is not parameter:
                    parameter.copy_(values)  # rounded to the parameter's precision
                offset += parameter.numel()

    def after_step(self, model: torch.nn.Module) -> dict[str, float | None]:
        """The geometry of the update just made. Where no cycle history is kept (S = 0, or a model too
        large for one), it holds three fp32 vectors of the parameters' size (theta_0, theta_t and
        d_{t-1}) and makes no fourth: d_t is written over theta_t, and theta_{t+1} over d_{t-1} once
        Grad CosSim has used it; 12 bytes a parameter, where flat copies peaked at 20 (25 GB for a 1B
        model). Either way, the same floats."""
        values = self._values()
        factors = self._factors()
        # theta_t's vector is free to take d_t unless it is also theta_0's or a history entry's
        overwrite = self.history is None and self.previous.dense is not self.theta_0.dense
        update_dense = self.previous.dense if overwrite else torch.empty_like(self.previous.dense)
        update = Delta(flat_into(values, update_dense, minus=self.previous.dense),
                       low_rank_difference(factors, self.previous.factors, self.scales))
        update_norm = update.norm()
        cos_sim = None
        if self.previous_update is not None:
            denominator = update_norm * self.previous_update.norm()
            if denominator > 0:  # no direction where an update was skipped (zero): undefined, null
                cos_sim = min(1.0, max(-1.0, update.dot(self.previous_update) / denominator))  # rounding
        # d_{t-1} has been used: its vector holds theta_{t+1} - theta_0, then theta_{t+1}
        spare = self.previous_update.dense if overwrite and self.previous_update is not None else None
        scratch = spare if spare is not None else torch.empty_like(update_dense)
        drift = Delta(flat_into(values, scratch, minus=self.theta_0.dense),
                      low_rank_difference(factors, self.theta_0.factors, self.scales)).norm()
        cycle_drift = None
        if self.history is None:
            current = Snapshot(flat_into(values, scratch), factors)
        else:  # history[0] is theta_{t+1-S}; the history keeps its own vectors
            current = Snapshot(flat_into(values, torch.empty_like(update_dense)), factors)
            cycle_drift = difference(current, self.history[0], self.scales).norm()
            self.history.append(current)
        self.previous, self.previous_update = current, update
        self.path_length += update_norm
        return {
            "grad_cos_sim": cos_sim,
            "update_norm": update_norm,
            "drift": drift,
            "path_length": self.path_length,
            "cycle_drift": cycle_drift,
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, plain data) for a checkpoint; `restore` takes them back."""
        tensors: dict[str, torch.Tensor] = {}
        _put(tensors, "theta_0", self.theta_0.dense, self.theta_0.factors)
        _put(tensors, "previous", self.previous.dense, self.previous.factors)
        if self.previous_update is not None:
            _put(tensors, "previous_update", self.previous_update.dense, self.previous_update.low_rank)
        for index, theta in enumerate(self.history or []):
            _put(tensors, f"history.{index}", theta.dense, theta.factors)
        return tensors, {"path_length": self.path_length, "history": len(self.history or [])}

    def restore(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        def snapshot(name: str) -> Snapshot:
            return Snapshot(*_take(tensors, name, len(self.adapters)))

        theta_0 = snapshot("theta_0")
        if theta_0.numel() != self.theta_0.numel():
            raise ValueError(f"the checkpoint's update-geometry state has {theta_0.numel()} values where this "
                             f"model has {self.theta_0.numel()} (a LoRA run checkpointed by stalerl before 0.x?)")
        self.theta_0, self.previous = theta_0, snapshot("previous")
        self.previous_update = Delta(*_take(tensors, "previous_update", len(self.adapters))) \
            if "previous_update" in tensors else None
        self.path_length = data["path_length"]
        if self.history is not None:
            self.history.clear()
            self.history.extend(snapshot(f"history.{index}") for index in range(data["history"]))


def _put(tensors: dict[str, torch.Tensor], name: str, dense: torch.Tensor,
         pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    tensors[name] = dense  # the name alone: a checkpoint of a model without LoRA reads as before
    for index, (left, right) in enumerate(pairs):
        tensors[f"{name}.lora.{index}.left"], tensors[f"{name}.lora.{index}.right"] = left, right


def _take(tensors: dict[str, torch.Tensor], name: str, modules: int) -> tuple[torch.Tensor, list]:
    return tensors[name], [(tensors[f"{name}.lora.{i}.left"], tensors[f"{name}.lora.{i}.right"])
                           for i in range(modules)]


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null (inside dicts and lists too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


TENSORBOARD_QUEUE = 1000  # events: about 30 steps of the ~35 scalars a step logs


class MetricsWriter:
    """One JSON line a step in metrics.jsonl, per-sample lags in samples.jsonl, TensorBoard scalars
    when asked. Append-only and line-atomic: each line is one unbuffered write call, so a killed run
    keeps every finished step and at worst a truncated last line (read_metrics skips it).
    `purge_step`: a resumed run's first step; TensorBoard hides its older events from there on.
    `wandb_run`: W&B gets the same scalars (wandb_logging.py); train() ends it, with the summary."""

    def __init__(self, run_dir: Path, tensorboard: bool, purge_step: int | None = None,
                 wandb_run: WandbRun | None = None):
        self.wandb_run = wandb_run
        self.metrics_file = open(run_dir / "metrics.jsonl", "ab", buffering=0)
        self.samples_file = open(run_dir / "samples.jsonl", "ab", buffering=0)
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A queue of a few dozen steps' scalars: at the default 10, each add_scalar waited for the
            # writer thread to take the GIL and make room, 19 ms a step on the learner's path (at S = 2
            # runs took 1.05-1.16x as long; README). Close flushes it; metrics.jsonl stays the record of a killed run.
            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step,
                                             max_queue=TENSORBOARD_QUEUE)

    def write(self, metrics: dict[str, Any], samples: dict[str, Any]) -> None:
        self.metrics_file.write((json.dumps({k: finite_or_none(v) for k, v in metrics.items()}) + "\n").encode())
        self.samples_file.write((json.dumps(samples) + "\n").encode())
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(key, value, metrics["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(metrics)

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
