"""The suite: which parts run on which model, bench.json, and the parts an earlier report keeps."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from stalerl.bench.generation import bench_generation
from stalerl.bench.memory import bench_memory
from stalerl.bench.overlap import bench_async
from stalerl.bench.plan import CHECKPOINT_DEFAULTS, CHECKPOINT_PARTS, Plan, base_config, default_plan
from stalerl.bench.runs import isolated
from stalerl.bench.step import bench_step
from stalerl.bench.sweep import bench_sweep
from stalerl.guards import output_directory


PARTS = ("step", "gen", "async", "sweep", "memory")
REPORT_FORMAT = 2  # bench.json's layout: one up whenever a part's fields change (kept_parts mixes only equal ones)
# What the parts vary from run to run (the gen part's variants set the cache and prompt sharing themselves).
BENCH_SETS = ("steps", "out", "staleness.staleness", "runtime.local_worker", "runtime.rollout_cuda_stream")


def checked_model_settings(checkpoint: str, data: str, settings: dict, parts: tuple[str, ...]) -> dict:
    """The config changes that the gen and async parts run under; a clear error before any work."""
    from stalerl.config import ConfigError
    from stalerl.preflight import is_missing_directory
    from stalerl.random_checkpoint import shape_of

    fixed = [key for key in BENCH_SETS if key in settings]
    if fixed:
        raise ConfigError(f"--set {fixed[0]}: the bench sets it itself, run by run")
    if not checkpoint:
        if data:
            raise ConfigError("--data: needs --model (the embedded default has its own task)")
        base_config(**settings)
        return dict(settings)
    try:
        shape = shape_of(checkpoint)
    except ValueError as error:
        raise ConfigError(f"--model: {error}") from None
    if not shape and is_missing_directory(checkpoint):
        raise ConfigError(f"--model: directory not found: {checkpoint}")
    if not data or not Path(data).is_file():
        raise ConfigError(f"--data: {'file not found: ' + data if data else 'a checkpoint needs a JSONL or Parquet file'}")
    if any(part not in CHECKPOINT_PARTS for part in parts):
        raise ConfigError(f"--parts: with --model only {','.join(CHECKPOINT_PARTS)} run (the others time the "
                          f"embedded default)")
    model = CHECKPOINT_DEFAULTS | {"model.name_or_path": checkpoint, "task.data": data} | settings
    base_config(**model)
    return model


def on_gpu(model: dict) -> bool:
    """Whether the gen and async runs put the model on a GPU (the embedded default stays on CPU)."""
    from stalerl.preflight import resolve_device

    return resolve_device(base_config(**model).model).type == "cuda"


def make_random_checkpoint(shape: str, path: str, data: str) -> dict:
    from stalerl.random_checkpoint import save_random_checkpoint

    save_random_checkpoint(shape, Path(path), Path(data))
    return {}


def run_bench(out: Path, quick: bool, plan: Plan | None = None, parts: tuple[str, ...] = PARTS,
              log: Callable[[str], None] = print, checkpoint: str = "", data: str = "",
              settings: dict | None = None) -> dict:
    """Runs the suite, writes out/bench.json and returns it.

    checkpoint: time the gen and async parts on this Hugging Face checkpoint directory (or
    random:SHAPE) and the math task in `data`; settings: config changes for those parts.
    """
    import torch
    import transformers

    from stalerl.bench.trl_step import trl_version
    from stalerl.provenance import cpu_model, git_revision
    from stalerl.random_checkpoint import shape_of

    model = checked_model_settings(checkpoint, data, settings or {}, parts)
    plan = plan or default_plan(quick, bool(checkpoint))
    output_directory(out, "--out")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "quick": quick, "plan": dataclasses.asdict(plan),
        "machine": {"cpus": os.cpu_count(), "load_avg_before": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version(),
                    "gpu": gpu, "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "stalerl_git": git_revision()},  # which code and which kernels made the figures
        "model": {"checkpoint": checkpoint or "embedded default", "settings": model},
    }
    report |= kept_parts(out / "bench.json", parts)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stalerl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        shape = shape_of(checkpoint)
        if shape:  # made in a child process, so that this one holds no GPU memory
            model["model.name_or_path"] = str(tmp / f"random-{shape}")
            isolated(make_random_checkpoint, shape, model["model.name_or_path"], data)
            log(f"bench: random {shape} checkpoint written in {time.perf_counter() - started:.0f} s")

        def save(partial: dict) -> None:  # a killed bench keeps what it finished
            (out / "bench.json").write_text(json.dumps(report | partial, indent=2))

        steps = {"step": lambda: bench_step(plan, tmp, log), "gen": lambda: bench_generation(plan, model, on_gpu(model)),
                 "async": lambda: bench_async(plan, tmp, model, on_gpu(model),
                                              progress=lambda unfinished: save({"async": unfinished})),
                 "sweep": lambda: bench_sweep(plan, tmp), "memory": lambda: bench_memory(plan, tmp)}
        for part in parts:
            part_start = time.perf_counter()
            report[part] = steps[part]()
            log(f"bench: {part} done in {time.perf_counter() - part_start:.0f} s")
            save({})
    report["machine"]["load_avg_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    return report


def kept_parts(path: Path, parts: tuple[str, ...]) -> dict:
    """The parts of an earlier report in the same directory that this run does not redo, so that
    `--parts` updates a report instead of replacing it; `earlier_parts` says where each came from.
    A report that is not one, or of another REPORT_FORMAT, is refused rather than overwritten."""
    from stalerl.config import ConfigError

    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a bench report ({error}); use another --out or move it away") from None
    if not isinstance(earlier, dict):
        raise ConfigError(f"{path}: not a bench report (not a JSON object); use another --out or move it away")
    others = [part for part in PARTS if part in earlier and part not in parts]
    if others and earlier.get("format") != REPORT_FORMAT:
        raise ConfigError(f"{path} is a report of another stalerl version (format {earlier.get('format', 1)}, "
                          f"this one writes {REPORT_FORMAT}): its {', '.join(others)} part(s) would be lost; "
                          f"use another --out, or move it away")
    provenance = dict(earlier.get("earlier_parts", {}))
    kept: dict[str, Any] = {part: earlier[part] for part in others}
    if others:
        kept["earlier_parts"] = {part: provenance.get(part) or {key: earlier.get(key) for key in
                                                                ("quick", "plan", "machine", "model")}
                                 for part in others}
    return kept

