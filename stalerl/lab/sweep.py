"""``stalerl sweep``: a grid over staleness x learning rate (x seeds x stabilizers), run in parallel.

    stalerl sweep --staleness 0,4,16 --lr 1e-4,3e-4,1e-3 --steps 200 --out DIR [--workers 2]

One run directory per cell under DIR; a finished cell (its summary.json exists) is not rerun and an
unfinished one goes on from its newest checkpoint (or starts over without one), so an interrupted
sweep resumes by running the command again. A cell is reused only if its saved config.yaml is the
one asked for: before any cell runs, a directory that holds a run of another config (or something
that is not a run) is refused with a one-line error naming the cell and the setting, and it is never
deleted. DIR/sweep.json is the table of cells.
The cells run in `--workers` processes, one cell at a time each with one torch thread, so cells do
not fight over the cores; on CPU the workers are forked from a server that has imported torch once
(stalerl/forking.py).
Ctrl-C or SIGTERM stops the sweep as it stops a run: each running cell stops after its step with a
checkpoint, no new cell starts, and the same command goes on from there; a second one quits at once.
A worker whose sweep was killed outright stops its cell the same way and exits, so no orphan keeps
writing into a cell. With `--runtime ray` each cell runs in a Ray actor of its own
(ray_runtime.run_configs_on_ray), and Ctrl-C or SIGTERM stops the cells in the same way.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stalerl import forking
from stalerl.config import ConfigError, TrainConfig, load_config, override, validate
from stalerl.wandb_logging import sweep_group
from stalerl.guards import Interrupted, RunStopped, StopRequests, output_directory, stop_signals_blocked, when_ended
from stalerl.lab.runs import is_finished, load_run
from stalerl.metrics import finite_or_none

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
    for flag, values in (("--staleness", staleness), ("--lr", lrs), ("--seeds", seeds), ("--stabilizers", stabilizers)):
        if not values:
            raise ConfigError(f"{flag}: no values given (e.g. {flag} {SWEEP_EXAMPLES[flag]})")
    cells = []
    for stabilizer in stabilizers:
        for s in staleness:
            for lr in lrs:
                for seed in seeds:
                    cell = Cell(s, lr, seed, stabilizer)
                    changes = {"staleness.staleness": s, "optim.lr": lr, "seed": seed,
                               "out": str(out / cell.name), "progress": False, **STABILIZERS[stabilizer]}
                    if base.wandb.project:  # W&B: a run per cell, named after it, in the sweep's group
                        changes |= {"wandb.group": sweep_group(base, out), "wandb.name": cell.name}
                    cells.append((cell, validate(override(base, changes))))
    names: dict[str, Cell] = {}
    for cell, _ in cells:
        if cell.name in names:  # e.g. --lr 1e-4,0.0001: two cells, one directory
            raise ConfigError(f"two cells would share the directory {out / cell.name} ({_describe(names[cell.name])} "
                              f"and {_describe(cell)}); give each value once")
        names[cell.name] = cell
    return cells


SWEEP_EXAMPLES = {"--staleness": "0,4,16", "--lr": "1e-4,3e-4", "--seeds": "0,1", "--stabilizers": "none,staleness"}


def _describe(cell: Cell) -> str:
    return f"S={cell.staleness} lr={cell.lr!r} seed={cell.seed} stabilizer={cell.stabilizer}"


# ---------------------------------------------------------------- worker processes

_sweep_stopping: Any = None  # the sweep's stop event (multiprocessing.Event), shared with the workers
_worker_stop = StopRequests(quit_on_second=False)  # a worker's signals between cells and while one starts
_orphaned = threading.Event()  # the sweep's process is gone
_in_cell = threading.Event()  # a cell is running (or starting) in this worker


def _worker_setup(sweep_pid: int, stopping: Any, environment: dict[str, str]) -> None:
    """A local sweep worker. It starts with SIGINT and SIGTERM blocked (run_sweep; a forked one from
    its fork server), so that none is lost or kills it before it can take them: from here on
    _worker_stop records them between cells and while a cell starts (never a traceback), and the
    cell's train() takes over such a request (guards.StopRequests). A worker never quits mid-step on
    a repeated signal (the sweep's own and one sent to the whole job, say): quitting at once is the
    sweep's decision (SweepStop)."""
    global _sweep_stopping
    forking.adopt_environment(environment)
    _sweep_stopping = stopping
    os.setpgrp()  # out of the terminal's process group: Ctrl-C reaches the sweep, which passes it on
    _worker_stop.install()
    forking.take_stop_signals()
    when_ended(sweep_pid, _sweep_ended, "stalerl-follow-sweep")


def _sweep_ended() -> None:
    # The sweep was killed outright: the cell in progress stops after its step with a checkpoint, as
    # on SIGTERM, no queued cell starts, and the worker ends; otherwise it would go on writing into
    # cells that a rerun of the sweep may have started again.
    _orphaned.set()
    os.kill(os.getpid(), signal.SIGTERM)
    while _in_cell.is_set():
        time.sleep(0.5)
    os._exit(1)


def run_cell(config_data: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Runs in a worker process: one training run (resumed from its checkpoint), returns its summary."""
    _in_cell.set()  # before the checks: _follow_sweep then waits for this cell instead of ending it mid-write
    try:
        if _orphaned.is_set() or _worker_stop.requested or (_sweep_stopping is not None and _sweep_stopping.is_set()):
            raise Interrupted("not started: the sweep was stopping")
        from stalerl.config import TrainConfig, from_dict
        from stalerl.train import train

        return train(from_dict(TrainConfig, config_data), resume=resume)
    finally:
        _in_cell.clear()


class SweepStop:
    """Ctrl-C / SIGTERM in the sweep's process: no new cell starts, and the signal goes on to the
    workers, whose running cells stop after their step with a checkpoint. A second one kills the
    workers (their earlier checkpoints stay, as after a killed run)."""

    def __init__(self, stopping: Any):
        self.stopping = stopping  # multiprocessing.Event, shared with the workers (on Ray a threading.Event)
        self.requested: str | None = None
        self.again = False  # a second signal: on Ray, run_configs_on_ray then kills the cells' actors

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.requested is None
        if first:  # no lock taken twice, nothing printed twice
            self.requested = signal.Signals(signum).name
            self.stopping.set()
        else:
            self.again = True
        for worker in multiprocessing.active_children():  # the pool's processes (none on Ray)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum if first else signal.SIGKILL)
        if first:
            print(f"stalerl: {self.requested}: the sweep stops; running cells stop after their step with a "
                  f"checkpoint (again to quit at once)", file=sys.stderr, flush=True)


# Settings a fixed-lr run never reads (the staleness-aware cap's), ignored when a saved cell is
# compared, so that `--stabilizers none,staleness --set stabilizer.r_batch=X` reuses the fixed cells.
UNUSED_WITHOUT_STALENESS_CAP = ("stabilizer.k", "stabilizer.r_batch")


def saved_config(cell: Cell, config: TrainConfig) -> TrainConfig | None:
    """The config a cell's directory already holds, if it is the one asked for; None for no directory
    (or an empty one). Raises ConfigError, in one line, when it holds anything else."""
    run_dir = Path(config.out)
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return None
    from stalerl.checkpoint import NOT_THE_RUNS_STEPS, config_difference  # torch and transformers: when needed
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"sweep cell {cell.name}: {run_dir} exists but holds no run (no config.yaml); "
                          f"move it away or use another --out")
    try:
        saved = load_config(run_dir / "config.yaml")
    except ConfigError as error:
        raise ConfigError(f"sweep cell {cell.name}: {error}") from None
    ignore = NOT_THE_RUNS_STEPS
    if saved.stabilizer.lr_control != "staleness" and config.stabilizer.lr_control != "staleness":
        ignore += UNUSED_WITHOUT_STALENESS_CAP
    difference = config_difference(saved, config, ignore)
    if difference:
        raise ConfigError(f"sweep cell {cell.name}: {run_dir} holds a run of another config ({difference}); "
                          f"use another --out, or move that directory away")
    return replace(saved, out=config.out, progress=config.progress, wandb=config.wandb)


def can_resume(run_dir: Path, config: TrainConfig) -> bool:
    """An unfinished cell of this very config with a usable checkpoint (checkpoint.py)."""
    from stalerl.checkpoint import check_resumable, newest_valid

    try:
        check_resumable(run_dir, config)
        return newest_valid(run_dir) is not None
    except ConfigError:
        return False


def plan_cells(cells: list[tuple[Cell, TrainConfig]]) -> list[tuple[Cell, TrainConfig, str]]:
    """(cell, config, what to do: "done", "resume" or "start") for every cell, before any runs: a cell
    whose directory holds another config stops the whole sweep here (saved_config)."""
    plan, problems = [], []
    for cell, config in cells:
        try:
            saved = saved_config(cell, config)
        except ConfigError as error:
            problems.append(str(error))
            continue
        if saved is None:
            plan.append((cell, config, "start"))
        elif is_finished(Path(config.out)):
            plan.append((cell, saved, "done"))
        else:  # an unfinished run of this config: from its checkpoint, or redone from the start
            plan.append((cell, saved, "resume" if can_resume(Path(config.out), saved) else "start"))
    if problems:
        more = f" (and {len(problems) - 1} more cell(s) like it)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    return plan


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
    """Runs the unfinished cells: `workers` local processes, or Ray actors of `cpus_per_run` CPUs each."""
    if (out / "config.yaml").is_file():  # the lab would read it as one run and not see the cells
        raise ConfigError(f"--out {out}: holds a training run (config.yaml), not a sweep; use another directory")
    plan = plan_cells(cells)
    first = next((config for _, config, action in plan if action != "done"), None)
    if first is not None and runtime == "ray":
        from stalerl.ray_runtime import check_ray_address

        check_ray_address(ray_address or "")
    elif first is not None:  # here, not in a worker after a minute: the cells share model, task and hardware
        from stalerl.preflight import check_inputs

        check_inputs(first)
    output_directory(out, "--out")
    rows: dict[str, dict] = {}
    todo = []
    for cell, config, action in plan:
        run_dir = Path(config.out)
        if action == "done":  # collapse fields as the lab reads them now (runs.recomputed_summary)
            rows[cell.name] = sweep_row(cell, load_run(run_dir).summary, run_dir)
            continue
        if action == "start" and run_dir.exists():
            # Empty, or an interrupted run of this very config without a usable checkpoint (plan_cells
            # has checked the config.yaml): redone from the start.
            shutil.rmtree(run_dir)
        todo.append((cell, config, action == "resume"))
    bar = tqdm(total=len(cells), initial=len(rows), desc="sweep", disable=not progress, dynamic_ncols=True)
    if runtime == "ray":
        stop, stopped = _run_on_ray(todo, rows, out, cells, ray_address, cpus_per_run, bar)
    else:
        stop, stopped = _run_locally(todo, rows, out, cells, workers, bar)
    bar.close()
    if stop.requested:
        write_table(out, [rows[c.name] for c, _ in cells if c.name in rows])
        raise Interrupted(f"{stop.requested}: sweep stopped, {len(rows)} of {len(cells)} cells finished "
                          f"({stopped} stopped or not started); rerun the same command to go on from their checkpoints")
    table = [rows[cell.name] for cell, _ in cells]
    write_table(out, table)
    return table


def _run_locally(todo: list[tuple[Cell, TrainConfig, bool]], rows: dict[str, dict], out: Path,
                 cells: list[tuple[Cell, TrainConfig]], workers: int, bar: tqdm) -> tuple[SweepStop, int]:
    """The cells (cell, config, resume) in `workers` local processes; returns the sweep's stop and how
    many cells were stopped or never started (_collect)."""
    context = worker_context([config for _, config, _ in todo])
    one_cell_each = _has_vllm_cells([config for _, config, _ in todo])
    if one_cell_each and sys.version_info < (3, 11):
        raise ConfigError("rollout.engine: a sweep of vLLM cells needs Python 3.11 or newer (a fresh process per cell)")
    options = {"max_tasks_per_child": 1} if one_cell_each else {}
    stop = SweepStop(context.Event())
    with stop.installed():
        # Workers are made with the stop signals blocked (they unblock them in _worker_setup), and so
        # is the pool's manager thread, which makes the replacement workers of max_tasks_per_child.
        with stop_signals_blocked():
            pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                          initializer=_worker_setup,
                                                          initargs=(os.getpid(), stop.stopping, dict(os.environ)),
                                                          **options)
            futures = {pool.submit(run_cell, config.to_dict(), resume): (cell, config)
                       for cell, config, resume in todo}
        with pool:
            stopped = _collect(futures, stop, rows, cells, out, bar)
    return stop, stopped


def worker_context(configs: list[TrainConfig]) -> Any:
    """How a local sweep makes its workers: fresh processes, without the parent's torch threads,
    forked from the fork server on CPU (which this starts, so calling it early overlaps the server's
    imports with the caller's), spawned on a GPU and for vLLM cells."""
    return forking.context("spawn" if _has_vllm_cells(configs) else None)


def _has_vllm_cells(configs: list[TrainConfig]) -> bool:
    # vLLM in process does not give its GPU memory back when its engine closes (vllm#21073): a worker
    # process runs one such cell, and the next cell gets a fresh one.
    return any(config.rollout.engine == "vllm" for config in configs)


def _collect(futures: dict, stop: SweepStop, rows: dict[str, dict], cells: list[tuple[Cell, TrainConfig]],
             out: Path, bar: tqdm) -> int:
    """Tables each cell as it finishes; after a stop, cancels the queued ones. Returns how many cells
    were stopped or never started."""
    stopped = 0
    for future in concurrent.futures.as_completed(futures):
        cell, config = futures[future]
        if stop.requested:
            for waiting in futures:
                waiting.cancel()
        try:
            summary = future.result()
        except (RunStopped, KeyboardInterrupt, concurrent.futures.CancelledError,
                concurrent.futures.process.BrokenProcessPool) as error:
            if not stop.requested:
                raise
            stopped += 1
            if isinstance(error, RunStopped):
                _report_stopped(cell, str(error))
            continue
        rows[cell.name] = sweep_row(cell, summary, Path(config.out))
        collapsed = sum(row["collapse_step"] is not None for row in rows.values())
        bar.set_postfix(collapsed=collapsed, refresh=False)
        bar.update()
        write_table(out, [rows[c.name] for c, _ in cells if c.name in rows])
    return stopped


def _report_stopped(cell: Cell, message: str) -> None:
    if not message.startswith("not started"):  # where it stopped, its checkpoint, the command that goes on
        tqdm.write(f"stalerl: {cell.name}: {message}", file=sys.stderr)


def _run_on_ray(todo: list[tuple[Cell, TrainConfig, bool]], rows: dict[str, dict], out: Path,
                cells: list[tuple[Cell, TrainConfig]], address: str | None, cpus_per_run: float,
                bar: tqdm) -> tuple[SweepStop, int]:
    """The cells, each in a Ray actor of its own (ray_runtime.run_configs_on_ray), a cell with a
    checkpoint resumed from it; Ctrl-C or SIGTERM stops them as _run_locally's workers. A failed cell is
    reported, not tabled. Returns the sweep's stop and how many cells were stopped or never started."""
    from stalerl.ray_runtime import run_configs_on_ray

    stop = SweepStop(threading.Event())  # installed by run_configs_on_ray, over the handler ray.init sets
    if not todo:  # every cell finished: no Ray to start
        return stop, 0
    summaries = run_configs_on_ray([config for _, config, _ in todo], cpus_per_run, address,
                                   resume=[resume for _, _, resume in todo], stop=stop)
    failed, stopped = [], 0
    for (cell, config, _), summary in zip(todo, summaries):
        if "interrupted" in summary and stop.requested:
            stopped += 1
            _report_stopped(cell, summary["interrupted"])
        elif "error" in summary or "interrupted" in summary:
            failed.append(f"{cell.name}: {summary.get('error') or summary['interrupted']}")
        else:
            rows[cell.name] = sweep_row(cell, summary, Path(config.out))
            bar.update()
    write_table(out, [rows[c.name] for c, _ in cells if c.name in rows])
    if failed:
        raise RuntimeError(f"{len(failed)} sweep cell(s) failed on Ray; rerun to retry them. " + "; ".join(failed))
    return stop, stopped


def write_table(out: Path, rows: list[dict]) -> None:
    """sweep.json: this command's cells, after the cells of earlier commands on the same directory
    (a sweep can be grown by running another grid into it). Written atomically."""
    path = out / "sweep.json"
    ours = {row["run_dir"] for row in rows}
    earlier = json.loads(path.read_text()) if path.is_file() else []
    merged = [row for row in earlier if row["run_dir"] not in ours] + rows
    temporary = out / "sweep.json.tmp"
    temporary.write_text(json.dumps(finite_or_none(merged), indent=2))  # JSON has no infinity: null
    temporary.replace(path)
