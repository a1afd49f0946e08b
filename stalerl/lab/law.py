"""The collapse law and the advice it gives (science.md, 'Collapse and the scaling law').

    eta << min{ R_batch / (S * G_upd), R_crit / (T * G_upd) }

Operational estimates, each from run logs and reported with its spread:
* G_upd:   ||d_t|| / eta_t per step, median over a run's pre-collapse steps; spread across runs.
* R_crit:  the cumulative learner drift sum_k ||d_k|| (= T * eta * G_upd) at the collapse step of
           each collapsed run; spread across runs.
* R_batch: the within-cycle drift ||theta_t - theta_{t-S}|| at which a run's clip fraction first
           leaves its small-drift regime (its moving average passes `clip_threshold`); spread across
           runs with S > 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stalerl.collapse import moving_average
from stalerl.lab.runs import RunRecord


@dataclass(frozen=True)
class Estimate:
    value: float  # the median over the contributing runs
    low: float  # the spread: lowest and highest contributing value
    high: float
    count: int  # how many runs contributed
    how: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _estimate(values: list[float], how: str) -> Estimate | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return Estimate(float(np.median(values)), float(min(values)), float(max(values)), len(values), how)


def estimate_g_upd(runs: list[RunRecord]) -> Estimate | None:
    per_run = []
    for run in runs:
        end = run.collapse_step if run.collapse_step is not None else len(run.metrics)
        g = [v for v in run.series("g_upd")[: max(end, 1)] if v is not None]
        if g:
            per_run.append(float(np.median(g)))
    return _estimate(per_run, "median over pre-collapse steps of ||d_t|| / eta_t, per run")


def estimate_r_crit(runs: list[RunRecord]) -> Estimate | None:
    values = [run.metrics[run.collapse_version - 1]["path_length"] for run in runs
              if run.collapse_version and run.stabilizer == "none"]
    return _estimate(values, "cumulative drift sum ||d_k|| of the policy version that collapsed, per collapsed run")


def first_crossing_drift(run: RunRecord, clip_threshold: float, window: int = 5) -> float | None:
    """Within-cycle drift at the first step where the clip fraction's moving average passes the threshold."""
    drifts, clips = run.series("cycle_drift"), run.series("clip_frac")
    if run.staleness == 0 or any(d is None for d in drifts):
        return None
    smoothed = moving_average([c or 0.0 for c in clips], window)
    for step in range(len(smoothed)):
        if smoothed[step] > clip_threshold:
            return float(drifts[step])
    return None


def estimate_r_batch(runs: list[RunRecord], clip_threshold: float = 0.05) -> Estimate | None:
    values = [first_crossing_drift(run, clip_threshold) for run in runs if run.stabilizer == "none"]
    return _estimate(values, f"within-cycle drift where the clip fraction's 5-step mean first passes "
                             f"{clip_threshold:g}, per run with S > 0")


@dataclass(frozen=True)
class LogLogFit:
    slope: float
    intercept: float
    slope_low: float  # 95% interval of the slope (t distribution); nan with 2 points
    slope_high: float
    points: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_loglog(x: list[float], y: list[float]) -> LogLogFit | None:
    """Least squares of log y on log x, with the slope's 95% interval."""
    pairs = [(a, b) for a, b in zip(x, y) if a and b and a > 0 and b > 0]
    if len(pairs) < 2 or len({a for a, _ in pairs}) < 2:
        return None
    log_x, log_y = np.log([a for a, _ in pairs]), np.log([b for _, b in pairs])
    slope, intercept = np.polyfit(log_x, log_y, 1)
    n = len(pairs)
    if n > 2:
        from scipy import stats

        residuals = log_y - (slope * log_x + intercept)
        standard_error = math.sqrt(residuals @ residuals / (n - 2) / ((log_x - log_x.mean()) ** 2).sum())
        half = stats.t.ppf(0.975, n - 2) * standard_error
    else:
        half = float("nan")
    return LogLogFit(float(slope), float(intercept), float(slope - half), float(slope + half), n)


def collapse_table(runs: list[RunRecord]) -> dict[str, Any]:
    """T_c * eta across eta (per S), the T_c-vs-eta and T_c-vs-S slopes, and the stable-eta boundary.

    T_c here is the policy version that collapsed (collapse step minus the lag of its batch): the
    training reward of step t is the reward of theta_{t-S}, so it shows a collapse S steps late.
    """
    fixed = [run for run in runs if run.stabilizer == "none"]
    collapsed = [run for run in fixed if run.collapse_step is not None]
    by_s: dict[int, dict[str, Any]] = {}
    for s in sorted({run.staleness for run in fixed}):
        at_s = [run for run in fixed if run.staleness == s]
        hit = [run for run in at_s if run.collapse_step is not None]
        stable_lrs = sorted({run.lr for run in at_s} - {run.lr for run in hit})
        collapsing_lrs = sorted({run.lr for run in hit})
        largest_stable = max([lr for lr in stable_lrs if not collapsing_lrs or lr < min(collapsing_lrs)], default=None)
        tc_eta = [run.collapse_version * run.lr for run in hit if run.collapse_version]
        by_s[s] = {
            "largest_stable_lr": largest_stable,
            "smallest_collapsing_lr": min(collapsing_lrs, default=None),
            "tc_eta": _estimate(tc_eta, "T_c * eta over collapsed runs").to_dict() if tc_eta else None,
            "tc_vs_eta": _fit_dict(fit_loglog([run.lr for run in hit], [run.collapse_version for run in hit])),
        }
    boundary = {s: row["largest_stable_lr"] for s, row in by_s.items() if row["largest_stable_lr"]}
    return {
        "by_staleness": by_s,
        "tc_vs_eta_all": _fit_dict(fit_loglog([run.lr for run in collapsed],
                                              [run.collapse_version for run in collapsed])),
        "tc_vs_s": _fit_dict(fit_loglog([max(run.staleness, 1) for run in collapsed if run.staleness > 0],
                                        [run.collapse_version for run in collapsed if run.staleness > 0])),
        "largest_stable_lr_vs_s": _fit_dict(fit_loglog([s for s in boundary if s > 0],
                                                       [boundary[s] for s in boundary if s > 0])),
    }


def _fit_dict(fit: LogLogFit | None) -> dict[str, Any] | None:
    return fit.to_dict() if fit else None


@dataclass(frozen=True)
class Advice:
    staleness: int
    horizon: int
    boundary_lr: float | None  # min of the two constraints: the predicted largest stable eta
    boundary_low: float | None  # the same with the estimates' least favourable ends of their spreads
    boundary_high: float | None
    recommended_lr: float | None  # safety * boundary: the law says eta << the bound
    active: str | None  # "stale-rollout (R_batch / (S G_upd))" or "horizon (R_crit / (T G_upd))"
    batch_limit: float | None
    horizon_limit: float | None
    missing: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def advise(g_upd: Estimate | None, r_crit: Estimate | None, r_batch: Estimate | None, staleness: int, horizon: int,
           safety: float = 0.5) -> Advice:
    missing = []
    if g_upd is None:
        missing.append("G_upd: no run with logged updates")
    if r_crit is None:
        missing.append("R_crit: no collapsed run (run a probe at a large learning rate until it collapses)")
    if r_batch is None and staleness > 0:
        missing.append("R_batch: no run with S > 0 whose clip fraction left its small-drift regime")
    limits: dict[str, tuple[float, float, float]] = {}
    if g_upd is not None and r_batch is not None and staleness > 0:
        limits["stale-rollout (R_batch / (S G_upd))"] = (
            r_batch.value / (staleness * g_upd.value), r_batch.low / (staleness * g_upd.high),
            r_batch.high / (staleness * g_upd.low))
    if g_upd is not None and r_crit is not None:
        limits["horizon (R_crit / (T G_upd))"] = (
            r_crit.value / (horizon * g_upd.value), r_crit.low / (horizon * g_upd.high),
            r_crit.high / (horizon * g_upd.low))
    batch = limits.get("stale-rollout (R_batch / (S G_upd))")
    horizon_limit = limits.get("horizon (R_crit / (T G_upd))")
    if not limits:
        return Advice(staleness, horizon, None, None, None, None, None, None, None, missing)
    active = min(limits, key=lambda name: limits[name][0])
    value = limits[active][0]
    return Advice(
        staleness=staleness, horizon=horizon, boundary_lr=value,
        boundary_low=min(v[1] for v in limits.values()), boundary_high=min(v[2] for v in limits.values()),
        recommended_lr=safety * value, active=active,
        batch_limit=batch[0] if batch else None, horizon_limit=horizon_limit[0] if horizon_limit else None,
        missing=missing,
    )


def law_report(runs: list[RunRecord], clip_threshold: float = 0.05) -> dict[str, Any]:
    g_upd, r_crit, r_batch = estimate_g_upd(runs), estimate_r_crit(runs), estimate_r_batch(runs, clip_threshold)
    return {
        "runs": len(runs),
        "g_upd": g_upd.to_dict() if g_upd else None,
        "r_crit": r_crit.to_dict() if r_crit else None,
        "r_batch": r_batch.to_dict() if r_batch else None,
        "collapse": collapse_table(runs),
    }
