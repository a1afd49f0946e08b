"""``stalerl sweep``: a grid over staleness x learning rate (x seeds x stabilizers), run in parallel.

    stalerl sweep --staleness 0,4,16 --lr 1e-4,3e-4,1e-3 --steps 200 --out DIR [--workers 2]

One run directory per cell under DIR; a finished cell (its summary.json exists) is not rerun and an
unfinished one goes on from its newest checkpoint (or starts over without one), so an interrupted
sweep resumes by running the command again. DIR/sweep.json is the table of cells.
Each run is a separate process with one torch thread, so cells do not fight over the cores.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stalerl.config import ConfigError, TrainConfig, override, validate
from stalerl.lab.runs import is_finished, load_run

# Stabilizer name -> config overrides. 'gac' caps the cosine between consecutive updates.
STABILIZERS: dict[str, dict[str, Any]] = {
    "none": {},
    "staleness": {"stabilizer.lr_control": "staleness"},
    "ess": {"stabilizer.lr_control": "ess"},
    "gac": {"stabilizer.gac_cos_threshold": 0.95},
}


@dataclass(frozen=True)
class Cell:
    staleness: int
    lr: float
    seed: int
    stabilizer: str

    @property
    def name(self) -> str:
        suffix = "" if self.stabilizer == "none" else f"-{self.stabilizer}"
        return f"S{self.staleness}-lr{self.lr:g}-seed{self.seed}{suffix}"


def cell_configs(base: TrainConfig, out: Path, staleness: list[int], lrs: list[float], seeds: list[int],
                 stabilizers: list[str]) -> list[tuple[Cell, TrainConfig]]:
    unknown = [name for name in stabilizers if name not in STABILIZERS]
    if unknown:
        raise ConfigError(f"--stabilizers: unknown {unknown[0]!r} (known: {', '.join(STABILIZERS)})")
    cells = []
    for stabilizer in stabilizers:
        for s in staleness:
            for lr in lrs:
                for seed in seeds:
                    cell = Cell(s, lr, seed, stabilizer)
                    changes = {"staleness.staleness": s, "optim.lr": lr, "seed": seed,
                               "out": str(out / cell.name), "progress": False, **STABILIZERS[stabilizer]}
                    cells.append((cell, validate(override(base, changes))))
    return cells


def run_cell(config_data: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Runs in a worker process: one training run (resumed from its checkpoint), returns its summary."""
    from stalerl.config import TrainConfig, from_dict
    from stalerl.train import train

    return train(from_dict(TrainConfig, config_data), resume=resume)


def can_resume(run_dir: Path, config: TrainConfig) -> bool:
    """An unfinished cell of this very config with a usable checkpoint (checkpoint.py)."""
    from stalerl.checkpoint import check_resumable, newest_valid

    try:
        check_resumable(run_dir, config)
        return newest_valid(run_dir) is not None
    except ConfigError:
        return False


def sweep_row(cell: Cell, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {
        "S": cell.staleness, "lr": cell.lr, "seed": cell.seed, "stabilizer": cell.stabilizer,
        "collapse_step": summary["collapse_step"], "collapse_version": summary.get("collapse_version"),
        "steps": summary["steps"],
        "best_val_reward": summary["best_val_reward"], "final_val_reward": summary["final_val_reward"],
        "initial_val_reward": summary["initial_val_reward"], "g_upd": summary["g_upd_median"],
        "drift_at_collapse": summary["drift_at_collapse"],
        "path_length_at_collapse": summary.get("path_length_at_collapse"),
        "wall_s": summary["wall_s"], "run_dir": run_dir.name,
    }


def run_sweep(cells: list[tuple[Cell, TrainConfig]], out: Path, workers: int, progress: bool = True,
              runtime: str = "local", ray_address: str | None = None, cpus_per_run: float = 1.0) -> list[dict]:
    """Runs the unfinished cells: `workers` local processes, or Ray tasks of `cpus_per_run` CPUs each."""
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    todo = []
    for cell, config in cells:
        run_dir = Path(config.out)
        if is_finished(run_dir):
            rows[cell.name] = sweep_row(cell, load_run(run_dir).summary, run_dir)
        elif can_resume(run_dir, config):
            todo.append((cell, config, True))
        else:
            if run_dir.exists():  # an interrupted cell without a usable checkpoint: redone from the start
                shutil.rmtree(run_dir)
            todo.append((cell, config, False))
    bar = tqdm(total=len(cells), initial=len(rows), desc="sweep", disable=not progress, dynamic_ncols=True)
    if runtime == "ray" and any(not resume for _, _, resume in todo):
        # Fresh cells go to Ray; a cell with a checkpoint resumes in the local pool below.
        _run_on_ray([(cell, config) for cell, config, resume in todo if not resume], rows, out, cells,
                    ray_address, cpus_per_run)
        bar.update(sum(not resume for _, _, resume in todo))
        todo = [item for item in todo if item[2]]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited torch threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_cell, config.to_dict(), resume): (cell, config) for cell, config, resume in todo}
        for future in concurrent.futures.as_completed(futures):
            cell, config = futures[future]
            rows[cell.name] = sweep_row(cell, future.result(), Path(config.out))
            collapsed = sum(row["collapse_step"] is not None for row in rows.values())
            bar.set_postfix(collapsed=collapsed, refresh=False)
            bar.update()
            write_table(out, [rows[c.name] for c, _ in cells if c.name in rows])
    bar.close()
    table = [rows[cell.name] for cell, _ in cells]
    write_table(out, table)
    return table


def _run_on_ray(todo: list[tuple[Cell, TrainConfig]], rows: dict[str, dict], out: Path,
                cells: list[tuple[Cell, TrainConfig]], address: str | None, cpus_per_run: float) -> None:
    """The cells as Ray tasks (ray_runtime.run_configs_on_ray); a failed cell is reported, not tabled."""
    from stalerl.ray_runtime import run_configs_on_ray

    summaries = run_configs_on_ray([config for _, config in todo], cpus_per_run, address)
    failed = []
    for (cell, config), summary in zip(todo, summaries):
        if "error" in summary:
            failed.append(f"{cell.name}: {summary['error']}")
        else:
            rows[cell.name] = sweep_row(cell, summary, Path(config.out))
    write_table(out, [rows[c.name] for c, _ in cells if c.name in rows])
    if failed:
        raise RuntimeError(f"{len(failed)} sweep cell(s) failed on Ray; rerun to retry them. " + "; ".join(failed))


def write_table(out: Path, rows: list[dict]) -> None:
    """sweep.json: this command's cells, after the cells of earlier commands on the same directory
    (a sweep can be grown by running another grid into it). Written atomically."""
    path = out / "sweep.json"
    ours = {row["run_dir"] for row in rows}
    earlier = json.loads(path.read_text()) if path.is_file() else []
    merged = [row for row in earlier if row["run_dir"] not in ours] + rows
    temporary = out / "sweep.json.tmp"
    temporary.write_text(json.dumps(merged, indent=2))
    temporary.replace(path)
