"""Collapse detection (science.md, 'Collapse and the scaling law'). Pure functions of a reward curve.

T_c is the first step of the collapsed stretch at the end of a run:

1. the trailing moving average of the training reward (`window` steps) stays below `threshold` from
   some step c to the end: it confirms the collapse, but it crosses the threshold up to window - 1
   steps after the rewards themselves fell (less in the first window - 1 steps, where the average
   holds fewer values), so c alone is late by an amount that depends on when the run broke, and
   so on S (an exact-lag run at S > 0 shows its first updates' rewards only after S steps);
2. T_c is c moved back over the raw rewards just before it that are below the threshold too (at
   most window - 1 steps): the first step of the unbroken below-threshold stretch that the average
   confirms. One batch at or above the threshold ends the stretch, so T_c is never earlier than the
   last reward that was not collapsed;
3. the stretch from T_c to the end must last at least `min_tail` steps, so that a dip at the very
   end of a run is not called a collapse.

In exact-lag runs the reward of step t is that of policy theta_{t-S}; the step is the same rule at
every S, and the collapsed policy version is the `version` of the metrics row at T_c.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    array = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(array, 0, 0.0))
    ends = np.arange(1, len(array) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def collapse_step(train_rewards: list[float], window: int, threshold: float, min_tail: int) -> int | None:
    """T_c: the first step of the below-threshold stretch that the trailing moving average confirms
    and that lasts to the end (module docstring). None for a run that did not collapse (right-censored)."""
    if not train_rewards:
        return None
    below = moving_average(train_rewards, window) < threshold
    if not below[-1]:
        return None
    above = np.flatnonzero(~below)
    confirmed = int(above[-1]) + 1 if len(above) else 0  # the average is below from here to the end
    start = confirmed
    while start > max(confirmed - window + 1, 0) and train_rewards[start - 1] < threshold:
        start -= 1
    return start if len(train_rewards) - start >= min_tail else None


def collapse_summary(history: list[dict[str, Any]], window: int, threshold: float, min_tail: int) -> dict[str, Any]:
    """The summary fields that follow from T_c, from the metrics rows of a run, as train.summarize
    writes them; the lab reads runs written before the current definition through this."""
    collapsed_at = collapse_step([row["train_reward"] for row in history], window, threshold, min_tail)
    # G_upd before the collapse (the first step's where it collapsed at once), skipped updates left out.
    rows = history if collapsed_at is None else history[: max(collapsed_at, 1)]
    g_upds = [row["g_upd"] for row in rows if row.get("g_upd") is not None]
    g_upd_median = float(np.median(g_upds)) if g_upds else None
    if collapsed_at is None:
        return {"collapse_step": None, "collapse_version": None, "drift_at_collapse": None,
                "path_length_at_collapse": None, "g_upd_median": g_upd_median}
    version = history[collapsed_at]["version"]  # the policy that sampled the batch of step T_c

    def of_version(key: str) -> float:  # row k logs theta_{k+1}; theta_0 has 0
        return history[version - 1][key] if version > 0 else 0.0

    return {"collapse_step": collapsed_at, "collapse_version": version, "drift_at_collapse": of_version("drift"),
            "path_length_at_collapse": of_version("path_length"), "g_upd_median": g_upd_median}
