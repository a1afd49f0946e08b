"""Collapse detection (science.md, 'Collapse and the scaling law'). Pure functions of a reward curve."""

from __future__ import annotations

import numpy as np


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    array = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(array, 0, 0.0))
    ends = np.arange(1, len(array) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def collapse_step(train_rewards: list[float], window: int, threshold: float, min_tail: int) -> int | None:
    """T_c: the first step after which the trailing moving average stays below `threshold` to the end.

    The below-threshold tail must last at least `min_tail` steps, so that a dip at the very end of
    a run is not called a collapse. Returns None for a run that did not collapse (right-censored).
    """
    if not train_rewards:
        return None
    below = moving_average(train_rewards, window) < threshold
    if not below[-1]:
        return None
    above = np.flatnonzero(~below)
    start = int(above[-1]) + 1 if len(above) else 0
    return start if len(below) - start >= min_tail else None
