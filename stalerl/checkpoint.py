"""Checkpoints: everything a run needs to go on exactly where it stopped.

    stalerl train --steps 900 --out runs/a --set checkpoint.every=50   # killed at step 612
    stalerl train --resume runs/a                                      # continues from step 600

A checkpoint is taken between two learner steps, when the learner holds theta_step:

    RUN/checkpoints/step-000600/
      model.safetensors      the learner's weights theta_step
      optimizer.safetensors  the optimizer's per-parameter state (AdamW moments and step counts)
      tensors.safetensors    UpdateTracker (theta_0, previous parameters, previous update, the
                             within-cycle history), torch's RNG state, and the tensors of the rollouts
                             in flight: in exact mode batches step..step+S-1, sampled by versions
                             nobody keeps any more (staleness.py, PipelineState), as rollouts.K.*
      state.json             step, optimizer param groups, tracker and LR-control scalars, the
                             rollouts' metadata, byte offsets of metrics.jsonl and samples.jsonl,
                             the initial validation reward and the wall time so far
      manifest.json          sha256 and size of every file above, written last

No pickle: tensors are safetensors, the rest JSON. A checkpoint is written into a temporary
directory, every file fsynced, then renamed into place, so a crash while writing leaves the previous
ones as they were; the newest `checkpoint.keep` are kept. On resume the manifest is checked: a
corrupt or truncated checkpoint is reported and the one before it is used. The outputs are cut back
to the checkpoint's offsets, so lines written after it (and a half-written last line) are replayed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from stalerl.config import ConfigError, TrainConfig, flat_items
from stalerl.metrics import UpdateTracker, read_metrics
from stalerl.stabilizers import LearningRateControl
from stalerl.staleness import PipelineState
from stalerl.tasks import Prompt

if TYPE_CHECKING:
    from stalerl.rollout import RolloutBatch

FORMAT = 1
FILES = ("model.safetensors", "optimizer.safetensors", "tensors.safetensors", "state.json")
BATCH_TENSORS = ("tokens_N_T", "attention_mask_N_T", "response_mask_N_L", "behavior_logprobs_N_L", "finished_N")


@dataclass
class Learner:
    """The learner-side objects a step changes; a checkpoint saves and restores them together."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tracker: UpdateTracker
    lr_control: LearningRateControl


@dataclass
class Restored:
    path: Path
    step: int  # learner steps done; the loop goes on at this step
    pipeline: PipelineState
    outputs: dict[str, int]  # byte offsets of the run's line files
    data: dict[str, Any]  # state.json's "run": initial_val_reward, wall_s, ...


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first (temporary directories of interrupted writes excluded)."""
    paths = [p for p in checkpoint_dir(run_dir).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(paths, key=lambda p: int(p.name[5:]), reverse=True)


# ---------------------------------------------------------------- writing


def save(run_dir: Path, step: int, learner: Learner, pipeline: PipelineState, outputs: dict[str, int],
         run: dict[str, Any], keep: int) -> Path:
    """Writes RUN/checkpoints/step-NNNNNN atomically and keeps the newest `keep`; returns its path.

    An OSError (a full disk) leaves no partial directory behind and the previous checkpoints intact.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    temporary = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        model_tensors, _ = _without_aliases(learner.model.state_dict())
        _write(temporary / "model.safetensors", safetensors_bytes(model_tensors))
        optimizer_tensors, optimizer_data = _optimizer_state(learner.optimizer)
        _write(temporary / "optimizer.safetensors", safetensors_bytes(optimizer_tensors))
        tracker_tensors, tracker_data = learner.tracker.state()
        # Copied, straight to host memory: the tracker may hold one tensor twice (previous = theta_0
        # before the first step, or the newest history entry), and on a GPU a clone there would
        # cost as much GPU memory as the tracker's vectors (15 GB for a 1B model).
        tensors = {f"tracker.{k}": v.to("cpu", copy=True) for k, v in tracker_tensors.items()} | _rng_tensors()
        batches = []
        for k, batch in enumerate(pipeline.batches):
            batch_tensors, batch_data = _batch_state(batch)
            tensors |= {f"rollouts.{k}.{name}": value for name, value in batch_tensors.items()}
            batches.append(batch_data)
        _write(temporary / "tensors.safetensors", safetensors_bytes({k: v.detach().contiguous() for k, v in tensors.items()}))
        state = {
            "format": FORMAT, "step": step, "optimizer": optimizer_data, "tracker": tracker_data,
            "lr_control": learner.lr_control.state(), "outputs": outputs, "run": run,
            "pipeline": {"version": pipeline.version, "next_batch": pipeline.next_batch, "batches": batches},
        }
        _write(temporary / "state.json", json.dumps(state).encode())
        manifest = {"format": FORMAT, "step": step, "files": {name: _describe(temporary / name) for name in FILES}}
        _write(temporary / "manifest.json", json.dumps(manifest, indent=1).encode())
        _fsync(temporary)
        if final.exists():  # the same step again (a resumed run stopped at once): the newer write wins
            stale = root / f".old-{final.name}-{os.getpid()}"
            final.rename(stale)
            shutil.rmtree(stale)
        temporary.rename(final)
        _fsync(root)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):  # from writes that a crash cut short
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _write(path: Path, data: bytes) -> None:
    """Writes and fsyncs from Python, so that a full disk raises OSError naming the file (safetensors'
    own save_file was seen to return silently on a full device)."""
    try:
        with open(path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error


def _without_aliases(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The state dict with tied tensors (an embedding shared with the output layer) kept once,
    and the names left out; safetensors refuses to store shared memory twice."""
    kept, aliases, seen = {}, set(), set()
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases.add(name)
        else:
            seen.add(key)
            kept[name] = tensor.detach().contiguous()
    return kept, aliases


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _rng_tensors() -> dict[str, torch.Tensor]:
    """torch's global generators (the loop seeds them; sampling itself uses per-batch generators)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    return tensors


def _batch_state(batch: RolloutBatch) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    generation = batch.generation
    tensors = {name: getattr(generation, name).cpu() for name in BATCH_TENSORS} | {"rewards_N": batch.rewards_N.cpu()}
    if batch.valid_N is not None:
        tensors["valid_N"] = batch.valid_N.cpu()
    data = {
        "batch_index": batch.batch_index, "version": batch.version, "group_size": batch.group_size,
        "sample_ids": batch.sample_ids, "gen_s": batch.gen_s, "extras": batch.extras,
        "completions": generation.completions,
        # Already scored: the prompts are kept for the record, not needed to train.
        "prompts": [{"text": p.text, "answer": p.answer, "record": p.record} for p in batch.prompts],
    }
    return tensors, json.loads(json.dumps(data, default=str))


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------- reading


def problem_with(path: Path, run_dir: Path) -> str | None:
    """Why the checkpoint at `path` cannot be used (a checksum, a missing file), or None."""
    if not (path / "manifest.json").is_file():
        return "manifest.json is missing"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for name, expected in manifest["files"].items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if _describe(path / name) != expected:
                return f"{name} does not match its sha256 in manifest.json (corrupt or truncated)"
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"manifest.json unreadable ({type(error).__name__}: {error})"
    for name, offset in state["outputs"].items():
        size = (run_dir / name).stat().st_size if (run_dir / name).is_file() else 0
        if size < offset:
            return f"{name} has {size} bytes, fewer than the {offset} this checkpoint wrote"
    return None


def newest_usable(run_dir: Path) -> Path | None:
    """The newest usable checkpoint, or None; quiet (for messages, where newest_valid would warn or raise)."""
    return next((path for path in list_checkpoints(run_dir) if problem_with(path, run_dir) is None), None)


def newest_valid(run_dir: Path) -> Path | None:
    """The newest usable checkpoint; each unusable newer one is reported on stderr."""
    found = list_checkpoints(run_dir)
    problems = []
    for path in found:
        problem = problem_with(path, run_dir)
        if problem is None:
            if problems:
                print(f"stalerl: warning: {'; '.join(problems)}; resuming from {path.name} instead", file=sys.stderr)
            return path
        problems.append(f"checkpoint {path} is unusable: {problem}")
    if problems:
        raise ConfigError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: {'; '.join(problems)}")
    return None


def restore(run_dir: Path, learner: Learner) -> Restored | None:
    """Loads the newest usable checkpoint into `learner`; None when the run has none yet."""
    path = newest_valid(run_dir)
    if path is None:
        print(f"stalerl: {run_dir} has no checkpoint yet: the run starts over", file=sys.stderr)
        return None
    state = json.loads((path / "state.json").read_text())
    device = next(learner.model.parameters()).device
    _, aliases = _without_aliases(learner.model.state_dict())
    result = learner.model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)), strict=False)
    missing = sorted(set(result.missing_keys) - aliases)
    if missing or result.unexpected_keys:
        raise ConfigError(f"{path}: the checkpoint's weights do not fit this model (missing {missing[:2]}, "
                          f"unexpected {result.unexpected_keys[:2]})")
    _load_optimizer(learner.optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    tensors = load_file(str(path / "tensors.safetensors"))
    # Copies: load_file's tensors are views into one buffer, aligned only to their element size, and CPU
    # reductions (the tracker's dot products) sum in an alignment-dependent order; bit for bit needs a copy.
    learner.tracker.restore({k.removeprefix("tracker."): v.to(learner.tracker.device, copy=True)
                             for k, v in tensors.items() if k.startswith("tracker.")}, state["tracker"])
    learner.lr_control.restore(state["lr_control"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    pipeline = state["pipeline"]
    batches = [_batch_from(data, {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rollouts.{i}.")})
               for i, data in enumerate(pipeline["batches"])]
    return Restored(path, state["step"], PipelineState(pipeline["version"], pipeline["next_batch"], batches),
                    state["outputs"], state["run"])


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], data: dict) -> None:
    fresh_groups = optimizer.state_dict()["param_groups"]
    groups = [{k: tuple(v) if isinstance(fresh[k], tuple) else v for k, v in group.items()}  # JSON made betas a list
              for group, fresh in zip(data["param_groups"], fresh_groups)]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in data["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _batch_from(data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RolloutBatch:
    # Here, not at the top: a sweep's driver checks its cells' checkpoints without transformers.
    from stalerl.rollout import Generation, RolloutBatch

    generation = Generation(**{name: tensors[name] for name in BATCH_TENSORS}, completions=data["completions"])
    return RolloutBatch(
        batch_index=data["batch_index"], version=data["version"], group_size=data["group_size"],
        prompts=[Prompt(**prompt) for prompt in data["prompts"]], generation=generation,
        rewards_N=tensors["rewards_N"], sample_ids=data["sample_ids"], gen_s=data["gen_s"], extras=data["extras"],
        valid_N=tensors.get("valid_N"),
    )


def truncate_outputs(run_dir: Path, outputs: dict[str, int] | None) -> list[dict[str, Any]]:
    """Cuts the line files back to a checkpoint's offsets; returns the metrics rows kept. With no
    checkpoint (None) the run starts over, and the rows it had logged are moved aside, not deleted:
    a bounded-mode run would not make them again."""
    logged = [run_dir / name for name in ("metrics.jsonl", "samples.jsonl") if (run_dir / name).exists()]
    if outputs is None and any(path.stat().st_size for path in logged):
        aside = run_dir / time.strftime("before-restart-%Y%m%d-%H%M%S")
        aside.mkdir()
        steps = len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        for path in logged:
            path.rename(aside / path.name)
        print(f"stalerl: the {steps} steps it had logged are kept in {aside}", file=sys.stderr)
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.exists():
            os.truncate(path, (outputs or {}).get(name, 0))
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []


# ---------------------------------------------------------------- the run directory on --resume


# What a run may change when it goes on: where it is, and how it is shown, validated, logged and
# checkpointed (no step, and no logged value, changes: a checkpoint only reads the pipeline's state).
NOT_THE_RUNS_STEPS = ("out", "progress", "val_in_background", "tensorboard", "wandb.", "checkpoint.")


def config_difference(saved: TrainConfig | dict[str, Any], given: TrainConfig,
                      ignore: tuple[str, ...] = NOT_THE_RUNS_STEPS) -> str:
    """'key: saved -> given' for each differing field, on one line; empty when they agree. `saved` may
    be plain data (a checkpoint's, perhaps of an older stalerl: fields it lacks are not compared).
    `ignore`: fields, or whole sections given as "name." ("collapse.")."""
    old = dict(flat_items(saved if isinstance(saved, dict) else saved.to_dict()))
    new = dict(flat_items(given.to_dict()))
    sections = tuple(name for name in ignore if name.endswith("."))
    return ", ".join(f"{key}: {old[key]!r} -> {new.get(key)!r}" for key in old
                     if old[key] != new.get(key) and key not in ignore and not key.startswith(sections) and key in new)


def check_resumable(run_dir: Path, config: TrainConfig) -> None:
    """Refuses, in one line, a directory that is not an unfinished run of `config`."""
    from stalerl.config import load_config

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    if (run_dir / "summary.json").is_file():
        raise ConfigError(f"--resume {run_dir}: the run is finished (summary.json exists); nothing to resume")
    saved = load_config(run_dir / "config.yaml")
    difference = config_difference(saved, config)
    if difference:
        raise ConfigError(f"--resume {run_dir}: the run was made with another config ({difference})")
    # config.yaml can be edited; the config a checkpoint was made with is in its state.json
    newest = newest_usable(run_dir)
    made_with = json.loads((newest / "state.json").read_text())["run"].get("config") if newest else None
    difference = config_difference(made_with, config) if made_with is not None else ""
    if difference:
        raise ConfigError(f"--resume {run_dir}: checkpoint {newest.name} was made with another config "
                          f"({difference}); was config.yaml edited?")

