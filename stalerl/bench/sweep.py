"""The bench's sweep part: 12 cells with 2 workers vs the same cells one at a time."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stalerl import forking
from stalerl.bench.plan import Plan, base_config
from stalerl.bench.runs import median_of


def bench_sweep(plan: Plan, tmp: Path) -> dict:
    """12 cells one at a time vs 2 at a time (`stalerl sweep --workers 2`), alternated, `repeats` times.

    Each run's summary has its wall time and its CPU time (all threads). A single run with S >= 1
    already uses more than one core (its rollout thread overlaps the learner), so the sweep can at
    best reach (CPU-seconds of its runs / cores) / (sum of single-run walls): `bound` below.
    """
    from stalerl.lab.sweep import cell_configs, run_sweep

    base = base_config(steps=plan.sweep_steps)
    # The workers' imports are left out, as they are from the single runs' times: on CPU the sweep
    # forks its workers from the fork server, which a full bench has running by now.
    forking.ready()
    timings: dict[int, list[dict]] = {1: [], 2: []}
    for repeat in range(plan.repeats):
        for workers in (1, 2):
            out = tmp / f"sweep-w{workers}-{repeat}"
            cells = cell_configs(base, out, [0, 1, 2, 4], [1e-4, 3e-4, 1e-3], [0], ["none"])[: plan.sweep_cells]
            start = time.perf_counter()
            run_sweep(cells, out, workers, progress=False)
            wall = time.perf_counter() - start
            summaries = [json.loads((Path(config.out) / "summary.json").read_text()) for _, config in cells]
            timings[workers].append({"wall_s": wall, "sum_of_runs_s": sum(s["wall_s"] for s in summaries),
                                     "sum_of_runs_cpu_s": sum(s["cpu_s"] for s in summaries)})
    serial_wall, runs_s = median_of(timings[1], "wall_s"), median_of(timings[1], "sum_of_runs_s")
    parallel, parallel_cpu = median_of(timings[2], "wall_s"), median_of(timings[2], "sum_of_runs_cpu_s")
    # What 2 workers can use: each run has a learner and a rollout thread of one torch thread each.
    cores = min(2 * 2, os.cpu_count() or 1)
    return {"cells": plan.sweep_cells, "steps": plan.sweep_steps, "workers": 2, "repeats": plan.repeats,
            "serial_wall_s": serial_wall, "sum_of_single_runs_s": runs_s,
            "single_runs_cores_used": median_of(timings[1], "sum_of_runs_cpu_s") / runs_s,
            "parallel_wall_s": parallel, "parallel_runs_cpu_s": parallel_cpu,
            "parallel_over_sum_of_runs": parallel / runs_s,
            "bound": parallel_cpu / cores / runs_s,
            "core_utilisation": parallel_cpu / (cores * parallel),
            "parallel_over_serial_wall": parallel / serial_wall, "runs": timings}
