"""The bench's timed runs: each in a fresh process that ends with the bench, and what it reports."""

from __future__ import annotations

import concurrent.futures
import os
import resource
import statistics
from pathlib import Path
from typing import Any, Callable

from stalerl import forking
from stalerl.config import TrainConfig


def _measured(bench_pid: int, environment: dict[str, str], function: Callable[..., dict], *args: Any) -> dict:
    from stalerl.guards import exit_with

    forking.adopt_environment(environment)
    forking.take_stop_signals()  # a forked run is stopped by SIGINT / SIGTERM as a spawned one is
    # A killed bench would leave its pool worker behind, still running a timed run (a 1B model's, say)
    # and holding the terminal's or a pipe's output open.
    exit_with(bench_pid, "stalerl-exit-with-bench")
    result = function(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def isolated(function: Callable[..., dict], *args: Any, method: str | None = None) -> dict:
    """Runs function(*args) in a fresh process (forked on CPU, spawned on a GPU: stalerl/forking.py;
    or started by `method`), which ends with this one; its result gets the process's peak RSS."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=forking.context(method)) as pool:
        return pool.submit(_measured, os.getpid(), dict(os.environ), function, *args).result()


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

