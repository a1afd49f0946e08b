"""The bench's async part: steps/s at S >= 1 over S = 0, against the ideal overlap of the two sides."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stalerl.bench.plan import WARMUP_STEPS, Plan, base_config
from stalerl.bench.runs import isolated, median_of, train_run
from stalerl.config import TrainConfig


# The rollout worker of an async row: a thread (the default), a process of its own, or (on a GPU)
# a thread whose kernels run on a CUDA stream of their own (runtime.rollout_cuda_stream).
WORKER_SETTINGS = {"thread": {}, "process": {"runtime.local_worker": "process"},
                   "own_stream": {"runtime.rollout_cuda_stream": "own"}}


def bench_async(plan: Plan, tmp: Path, model: dict, gpu: bool = False,
                progress: Callable[[dict], None] = lambda partial: None) -> dict:
    """The ideal overlap takes the rollout side's whole time per batch (sampling, reward, weight load).
    Rows for S >= 1 come again with `plan.async_process`, the rollout worker in a process of its
    own, and on a GPU with the thread on a CUDA stream of its own; a run of those that fails is
    reported (`<worker>_worker_error`), and the thread rows stand. After each run, `progress` gets
    the part as far as it goes (`unfinished`: runs done and planned), so a bench killed at a time
    limit (a GPU session's) keeps the runs it finished."""
    staleness = (0, *plan.async_staleness)
    workers = ["thread"] + ["process"] * plan.async_process + ["own_stream"] * gpu
    # Alternating within each repeat: S = 0, then each S >= 1 with every worker in turn.
    planned = [(repeat, s, worker) for repeat in range(plan.repeats) for s in staleness
               for worker in (workers if s > 0 else ["thread"])]
    runs: dict[tuple[int, str], list[dict]] = {}
    errors: dict[str, str] = {}
    for done, (repeat, s, worker) in enumerate(planned, start=1):
        if worker in errors:
            continue
        config = async_config(plan.async_steps, model, s, worker, tmp / f"async-S{s}-{worker}-r{repeat}")
        try:
            runs.setdefault((s, worker), []).append(isolated(train_run, config.to_dict(), WARMUP_STEPS))
        except Exception as failure:  # noqa: BLE001 - only the thread rows are needed
            if worker == "thread":
                raise
            errors[worker] = f"{type(failure).__name__}: {failure}"
        if done < len(planned):
            progress(async_summary(runs, errors, plan.async_steps) | {"unfinished": [done, len(planned)]})
    return async_summary(runs, errors, plan.async_steps)


def async_config(steps: int, model: dict, staleness: int, worker: str, out: Path) -> TrainConfig:
    """One async run as the bench times it: the model's settings, S and the rollout worker."""
    return base_config(steps=steps, **model, **{"staleness.staleness": staleness, **WORKER_SETTINGS[worker],
                                                "out": str(out)})


def async_summary(runs: dict[tuple[int, str], list[dict]], errors: dict[str, str], steps: int) -> dict:
    """The async part from the runs so far (the S = 0 thread run comes first): medians per row."""
    sync = runs[(0, "thread")]
    t_gen, t_train = median_of(sync, "rollout_s"), median_of(sync, "train_s")
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    sync_rate = median_of(sync, "steps_per_s")
    rows = []
    for (s, worker), timed in runs.items():
        if worker in errors:
            continue
        rate = median_of(timed, "steps_per_s")
        speedup = rate / sync_rate
        # each side's time while they overlap: what the overlap cost them
        rollout_s, train_s = median_of(timed, "rollout_s"), median_of(timed, "train_s")
        rows.append({"S": s, "worker": worker, "steps_per_s": rate, "speedup": speedup,
                     "fraction_of_ideal": speedup / ideal,
                     "share_of_ideal_gain": (speedup - 1) / (ideal - 1) if ideal > 1 else None,
                     "rollout_s": rollout_s, "train_s": train_s, "weight_sync_s": median_of(timed, "weight_sync_s"),
                     "sides_steps_per_s": sides_rate(s, rollout_s, train_s),
                     "wall_s": median_of(timed, "wall_s")})  # the whole run: start-up and validation too
    result = {"t_gen_s": t_gen, "t_train_s": t_train, "ideal_overlap": ideal, "threads_per_process": 1,
              "t_sample_s": median_of(sync, "gen_s"), "weight_sync_s": median_of(sync, "weight_sync_s"),
              "steps": steps, "rows": rows}
    for worker, error in errors.items():
        result[f"{worker}_worker_error"] = error
    return result


def sides_rate(staleness: int, rollout_s: float, train_s: float) -> float:
    """The steady rate that a run's median batch and step times allow: one after the other at S = 0,
    the slower side alone at S >= 1. A measured rate well off it says the timed steps were no steady
    state: an outlier step (a recompilation, say) below it, the rollout side's head start of up to S
    queued batches above it (a few timed steps of a rollout-bound run)."""
    return 1 / (rollout_s + train_s) if staleness == 0 else 1 / max(rollout_s, train_s)
