"""The bench's timed runs: each in a fresh process that ends with the bench, and what it reports."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import resource
import statistics
from pathlib import Path
from typing import Any, Callable

from stalerl.config import TrainConfig


# What every timed run imports, imported once by the fork server instead (torch and transformers
# take about 4 s a process on 2 cores; a quick bench starts some twenty runs).
PRELOADED = ["stalerl.train", "stalerl.bench.runs"]


def _measured(bench_pid: int, function: Callable[..., dict], *args: Any) -> dict:
    from stalerl.guards import exit_with

    # A killed bench would leave its pool worker behind, still running a timed run (a 1B model's, say)
    # and holding the terminal's or a pipe's output open.
    exit_with(bench_pid, "stalerl-exit-with-bench")
    result = function(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def start_method() -> str:
    """How a timed run's process starts. Forked from a server that has imported PRELOADED and run
    nothing, a run is as fresh as a spawned interpreter (no allocator state, no torch threads) and
    starts in a fraction of a second. Where torch sees a GPU, runs are spawned: a process forked from
    one whose imports touched the CUDA driver cannot use CUDA, and the server's imports have not been
    checked on a GPU; there a run takes minutes, so its 4 s of imports matter little."""
    import torch

    return "spawn" if torch.cuda.is_available() else "forkserver"


def isolated(function: Callable[..., dict], *args: Any, method: str | None = None) -> dict:
    """Runs function(*args) in a fresh process (start_method(), or `method`), which ends with this
    one; its result gets the process's peak RSS."""
    context = multiprocessing.get_context(method or start_method())
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(PRELOADED)  # read when the server starts, on the first run
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measured, os.getpid(), function, *args).result()


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


# ---------------------------------------------------------------- in the child processes


def train_run(config_data: dict, warmup: int) -> dict:
    """One stalerl run; per-step loop time wait_s + train_s (the learner's clock) after `warmup` steps."""
    from stalerl.config import from_dict
    from stalerl.metrics import read_metrics
    from stalerl.train import train

    config = from_dict(TrainConfig, config_data)
    summary = train(config)
    rows = read_metrics(Path(config.out))[warmup:]
    loop_s = [row["wait_s"] + row["train_s"] for row in rows]
    return {
        "s_per_step": statistics.median(loop_s),
        "steps_per_s": len(rows) / sum(loop_s),
        "gen_s": statistics.median(row["gen_s"] for row in rows),
        # what the rollout side spends per batch: sampling, scoring and loading the newest weights
        "rollout_s": statistics.median(row["gen_s"] + row["reward_s"] + row["weight_sync_s"] for row in rows),
        "weight_sync_s": statistics.median(row["weight_sync_s"] for row in rows),
        "train_s": statistics.median(row["train_s"] for row in rows),
        "wall_s": summary["wall_s"],
        "steps_timed": len(rows),
    }

