"""The bench's memory part: peak RSS against S in exact mode (no copies of old weights) and against
the batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stalerl.bench.plan import Plan, base_config
from stalerl.bench.runs import isolated
from stalerl.config import TrainConfig


def memory_run(config_data: dict, cycle_history: bool) -> dict:
    """A run for its peak RSS; `cycle_history=False` turns off the learner's cycle-drift history
    (metrics.py keeps the last S parameter vectors for it), leaving what the pipeline itself holds."""
    import stalerl.metrics
    from stalerl.config import from_dict
    from stalerl.train import train

    if not cycle_history:
        stalerl.metrics.MAX_CYCLE_HISTORY_FLOATS = 0
    summary = train(from_dict(TrainConfig, config_data))
    return {"weight_mb": summary["warm_start"]["parameters"] * 4 / 2**20}  # float32 on CPU

def bench_memory(plan: Plan, tmp: Path) -> dict:
    from stalerl.metrics import MAX_CYCLE_HISTORY_FLOATS

    rows = []
    for s in plan.memory_staleness:  # exact mode, the wide model, with and without the cycle-drift history
        for history in (True, False):
            config = base_config(steps=s + 4, **{**plan.memory_model, "staleness.staleness": s,
                                                 "rollout.prompts_per_step": 4, "out": str(tmp / f"mem-S{s}-{history}")})
            run = isolated(memory_run, config.to_dict(), history)
            rows.append({"model": "wide", "S": s, "prompts": 4, "cycle_history": history, **run})
    for prompts in plan.memory_prompts:  # the default model, S = 0
        config = base_config(steps=4, **{"rollout.prompts_per_step": prompts, "out": str(tmp / f"mem-P{prompts}")})
        rows.append({"model": "default", "S": 0, "prompts": prompts, "cycle_history": True,
                     **isolated(memory_run, config.to_dict(), True)})

    def slope(points: list[tuple[float, float]]) -> float:  # least squares
        x, y = np.array(points, dtype=float).T
        return float(np.polyfit(x, y, 1)[0])

    weight_mb = rows[0]["weight_mb"]
    wide = {history: {r["S"]: r["peak_rss_mb"] for r in rows if r["model"] == "wide" and r["cycle_history"] == history}
            for history in (True, False)}
    # metrics.py keeps the cycle-drift history only while S x parameters fits its cap: a slope is
    # taken over the S values where it does (with it) and over every S (the pipeline alone).
    parameters = weight_mb * 2**20 / 4
    kept = [s for s in wide[True] if s * parameters <= MAX_CYCLE_HISTORY_FLOATS]
    with_history = slope([(s, wide[True][s]) for s in kept]) if len(kept) > 1 else None
    pipeline = slope(list(wide[False].items()))
    return {"weight_mb_wide": weight_mb, "rows": rows,
            "extra_weight_copies_by_S": {str(s): (mb - wide[False][0]) / weight_mb for s, mb in wide[False].items()},
            "mb_per_unit_S_pipeline_only": pipeline, "weight_copies_per_unit_S_pipeline_only": pipeline / weight_mb,
            "history_kept_up_to_S": max(kept),
            "weight_copies_per_unit_S_with_history": None if with_history is None else with_history / weight_mb,
            "mb_per_prompt": slope([(r["prompts"], r["peak_rss_mb"]) for r in rows if r["model"] == "default"])}
