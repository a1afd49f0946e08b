"""The collapse law and the advice it gives (science.md, 'Collapse and the scaling law').

    eta << min{ R_batch / (S * G_upd), R_crit / (T * G_upd) }

S * eta * G_upd and T * eta * G_upd are the law's within-cycle and cumulative drifts for updates of
size eta * G_upd that all point the same way. Both constraints compare a drift with a radius:

* R_crit:  the cumulative drift ||theta_v - theta_0|| of each collapsed policy version v (runs that
           collapsed after their first cycle, v > S, and after at least two updates); spread across runs.
* R_batch: the largest within-cycle drift ||theta_t - theta_{t-S}|| up to the collapsed version, per
           run with S > 0 that collapsed after at least two updates; spread across runs.
  A collapse at version v only says that the radius lies between the drifts of theta_{v-1} and
  theta_v. At v = 1 that is anywhere below Adam's first step, whose size the learning rate sets, and
  theta_1 was made from theta_0's own batch (lag 0), so it says nothing of stale batches either:
  such runs are left out of both radii.
* the drifts themselves are measured on the runs that did not collapse, not assumed ballistic:
  D_T(eta) = ||theta_T - theta_0|| and W_S(eta) = ||theta_S - theta_0|| (the first cycle, the
  widest one: Adam's first steps are its largest), each fitted across learning rates as
  c * eta^beta. With a single stable learning rate beta = 1 is assumed, as the law does; a horizon
  past a run's length is reached by the run's own drift growth, D ~ t^alpha over its second half.

The largest stable eta is the one at which D_T reaches R_crit or W_S reaches R_batch, whichever
comes first. When every update is eta * G_upd along one direction this is the law's
min{R_batch / (S G_upd), R_crit / (T G_upd)}; `advise` reports that ballistic reading beside it.
G_upd (||d_t|| / eta_t, median over pre-collapse steps) is also what the staleness-aware learning
rate (stabilizers.py) tracks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from stalerl.collapse import moving_average
from stalerl.lab.runs import RunRecord, censoring_version


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


def _fixed(runs: list[RunRecord]) -> list[RunRecord]:
    """The fixed-learning-rate runs: every constant comes from these, never from a stabilizer's run."""
    return [run for run in runs if run.stabilizer == "none"]


def estimate_g_upd(runs: list[RunRecord]) -> Estimate | None:
    per_run = []
    for run in _fixed(runs):
        # The updates that made theta_1 .. theta_v, v the collapsed version (at v = 0 the first one). Not
        # the steps before the collapse step: in exact mode that is v + S, S updates after the collapse.
        end = run.collapse_version if run.collapse_version is not None else len(run.metrics)
        g = [v for v in run.series("g_upd")[: max(end, 1)] if v is not None]
        if g:
            per_run.append(float(np.median(g)))
    return _estimate(per_run, "median of ||d_t|| / eta_t over the updates up to the collapsed version, "
                              "per fixed-lr run")


def estimate_r_crit(runs: list[RunRecord]) -> Estimate | None:
    """||theta_v - theta_0|| of each collapsed version v past the first cycle (v > S): there the
    cumulative drift, not the within-cycle one alone, is what the policy had moved when it broke.
    Runs that collapsed at v = 1 are left out (the module's docstring says why)."""
    values = [run.metrics[run.collapse_version - 1]["drift"] for run in _fixed(runs)
              if run.collapse_version is not None and run.collapse_version > max(run.staleness, 1)]
    return _estimate(values, "cumulative drift ||theta_v - theta_0|| of the collapsed version v, "
                             "per run that collapsed after its first cycle (v > S) and at v >= 2")


def estimate_r_batch(runs: list[RunRecord]) -> Estimate | None:
    """The largest within-cycle drift a run with S > 0 reached up to its collapsed version v, for v >= 2
    (theta_1 is made from theta_0's own batch: the module's docstring says why v = 1 is left out)."""
    values = []
    for run in _fixed(runs):
        if run.staleness > 0 and run.collapse_version is not None and run.collapse_version >= 2:
            drifts = [d for d in run.series("cycle_drift")[: run.collapse_version] if d is not None]  # theta_1 .. theta_v
            values.append(max(drifts, default=None))
    return _estimate(values, "largest within-cycle drift ||theta_t - theta_{t-S}|| up to the collapsed "
                             "version v, per run with S > 0 that collapsed at v >= 2")


def first_crossing_drift(run: RunRecord, clip_threshold: float, window: int = 5) -> float | None:
    """Within-cycle drift at the first step where the clip fraction's moving average passes the threshold.

    The clip fraction of step t is measured at theta_t on data from theta_{t-S}, so the drift it saw
    is ||theta_t - theta_{t-S}||: the cycle_drift logged at step t - 1 (each row's geometry is after
    its update, theta_{t+1}), and 0 at step 0.
    """
    drifts, clips = run.series("cycle_drift"), run.series("clip_frac")
    if run.staleness == 0 or any(d is None for d in drifts):
        return None
    smoothed = moving_average([c or 0.0 for c in clips], window)
    for step in range(len(smoothed)):
        if smoothed[step] > clip_threshold:
            return float(drifts[step - 1]) if step > 0 else 0.0
    return None


def clip_onset_drift(runs: list[RunRecord], clip_threshold: float = 0.05) -> Estimate | None:
    """A diagnostic, not a radius: on the embedded default the clip fraction passes 0.05 in the first
    steps of every run with S > 0, stable or not (docs/lab.md), so it does not locate R_batch there."""
    values = [first_crossing_drift(run, clip_threshold) for run in _fixed(runs)]
    return _estimate(values, f"within-cycle drift where the clip fraction's 5-step mean first passes "
                             f"{clip_threshold:g}, per run with S > 0")


# ---------------------------------------------------------------- measured drift per learning rate


def cumulative_drift(run: RunRecord, horizon: int) -> float | None:
    """||theta_T - theta_0||: read from the run, or past its end by its own growth D ~ t^alpha."""
    drifts = run.series("drift")
    if horizon <= len(drifts):
        return drifts[horizon - 1]
    half = len(drifts) // 2
    growth = fit_loglog(list(range(half + 1, len(drifts) + 1)), drifts[half:])
    if growth is None:
        return None
    return drifts[-1] * (horizon / len(drifts)) ** growth.slope


def first_cycle_drift(run: RunRecord, staleness: int) -> float | None:
    """||theta_S - theta_0||, the widest within-cycle drift of a stable run (Adam's first steps are its largest)."""
    drifts = run.series("drift")
    return drifts[staleness - 1] if 0 < staleness <= len(drifts) else None


@dataclass(frozen=True)
class DriftFit:
    """A drift against the learning rate over the runs that did not collapse: D(eta) = e^intercept * eta^slope."""

    what: str  # "cumulative drift at T" or "first-cycle drift at S"
    length: int  # T or S
    slope: float  # beta; 1 (assumed) with a single stable learning rate
    slope_low: float
    slope_high: float
    intercept: float
    runs: int
    assumed_slope: bool

    def lr_at(self, radius: float) -> float:
        """The learning rate whose drift reaches `radius`."""
        return math.exp((math.log(radius) - self.intercept) / self.slope)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_drift(runs: list[RunRecord], what: str, length: int) -> DriftFit | None:
    measure = cumulative_drift if what == "cumulative" else first_cycle_drift
    points = [(run.lr, measure(run, length)) for run in _fixed(runs) if run.collapse_step is None]
    points = [(lr, drift) for lr, drift in points if drift is not None and drift > 0]
    if not points:
        return None
    name = f"{what} drift at {'T' if what == 'cumulative' else 'S'} = {length}"
    fit = fit_loglog([lr for lr, _ in points], [drift for _, drift in points])
    if fit is None:  # one learning rate: drift proportional to eta, as the law assumes
        log_ratio = float(np.mean([math.log(drift / lr) for lr, drift in points]))
        return DriftFit(name, length, 1.0, float("nan"), float("nan"), log_ratio, len(points), True)
    return DriftFit(name, length, fit.slope, fit.slope_low, fit.slope_high, fit.intercept, len(points), False)


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
    """Least squares of log y on log x, with the slope's 95% interval (fit_log_linear, one column)."""
    pairs = [(a, b) for a, b in zip(x, y) if a and b and a > 0 and b > 0]
    fit = fit_log_linear({"x": [a for a, _ in pairs]}, None, [b for _, b in pairs]) if pairs else None
    if fit is None:
        return None
    slope = fit["slopes"]["x"]
    return LogLogFit(slope["slope"], fit["intercepts"][0], slope["slope_low"], slope["slope_high"], fit["points"])


def fit_log_linear(columns: dict[str, list[float]], groups: list[Any] | None, y: list[float]) -> dict[str, Any] | None:
    """Least squares of log y on the logs of `columns` (one common slope each) plus one intercept per
    value of `groups` (or a single intercept), with each slope's 95% interval (t distribution; nan
    with no degree of freedom left). None when the slopes are not determined by the points."""
    names = list(columns)
    log_y = np.log(np.asarray(y, dtype=float))
    design = [np.log(np.asarray(columns[name], dtype=float)) for name in names]
    if groups is None:
        design.append(np.ones(len(log_y)))
    else:
        design += [np.asarray([g == level for g in groups], dtype=float) for level in sorted(set(groups))]
    matrix = np.column_stack(design)
    n, parameters = matrix.shape
    if n < parameters or np.linalg.matrix_rank(matrix) < parameters:
        return None
    coefficients, *_ = np.linalg.lstsq(matrix, log_y, rcond=None)
    degrees = n - parameters
    half = np.full(len(names), float("nan"))
    if degrees > 0:
        from scipy import stats

        residuals = log_y - matrix @ coefficients
        covariance = residuals @ residuals / degrees * np.linalg.inv(matrix.T @ matrix)
        half = stats.t.ppf(0.975, degrees) * np.sqrt(np.diag(covariance)[: len(names)])
    slopes = {name: {"slope": float(coefficients[i]), "slope_low": float(coefficients[i] - half[i]),
                     "slope_high": float(coefficients[i] + half[i])} for i, name in enumerate(names)}
    return {"points": n, "slopes": slopes, "intercepts": [float(c) for c in coefficients[len(names):]]}


Censoring = Literal["observed", "right", "left"]  # y is T itself; T > y (no collapse by y); T <= y


def censored_log_likelihood(parameters: np.ndarray, design: np.ndarray, log_y: np.ndarray,
                            kinds: np.ndarray) -> tuple[float, np.ndarray]:
    """Log-likelihood and gradient of log T = design @ coefficients + sigma * eps, eps ~ N(0, 1), with
    parameters = (coefficients, log sigma): an observed point contributes the density of its log T, a
    right-censored one P(log T > log y), a left-censored one P(log T <= log y)."""
    from scipy import stats

    coefficients, log_sigma = parameters[:-1], parameters[-1]
    sigma = math.exp(log_sigma)
    z = (log_y - design @ coefficients) / sigma
    observed, right = kinds == "observed", kinds == "right"
    # censored points: log Phi(w), with w = -z (right: T beyond y) or z (left: T at most y)
    w = np.where(right, -z, z)
    log_cdf = stats.norm.logcdf(w)
    mills = np.exp(stats.norm.logpdf(w) - log_cdf)  # phi(w) / Phi(w), stable in the tails
    value = float(np.sum(np.where(observed, -log_sigma - 0.5 * z**2 - 0.5 * math.log(2 * math.pi), log_cdf)))
    d_mean = np.where(observed, z, np.where(right, mills, -mills)) / sigma  # d log L_i / d mean_i
    d_log_sigma = np.where(observed, z**2 - 1, -mills * w)
    return value, np.append(design.T @ d_mean, d_log_sigma.sum())


def _hessian(gradient: Any, at: np.ndarray) -> np.ndarray:
    """Central differences of an analytic gradient (error O(h^2)), symmetrised."""
    columns = []
    for j in range(at.size):
        step = np.zeros(at.size)
        step[j] = 1e-5 * max(1.0, abs(at[j]))
        columns.append((gradient(at + step) - gradient(at - step)) / (2 * step[j]))
    hessian = np.column_stack(columns)
    return (hessian + hessian.T) / 2


def fit_censored_loglog(x: list[float], groups: list[Any], y: list[float],
                        kinds: list[Censoring]) -> dict[str, Any] | None:
    """Maximum likelihood of log y = a_group + b log x + sigma * eps with censored points (a log-normal
    accelerated failure time, or Tobit, model), and b's 95% interval from the observed information
    (a finite-difference Hessian of the log-likelihood at the optimum; nan where it is singular).

    A group with no observed point is left out (its intercept would run to infinity) and listed in
    groups_left_out. None when the observed points do not determine the slope with a residual to spare:
    then sigma -> 0 fits them exactly and the likelihood has no maximum (no observed point, all at one
    x, or too few). Without censored points this is least squares, with sigma^2 = RSS / n.
    """
    from scipy import optimize, stats

    keep = {g for g, kind in zip(groups, kinds) if kind == "observed"}
    if not keep:
        return None
    rows = [i for i, g in enumerate(groups) if g in keep]
    levels = sorted(keep)
    log_x = np.log(np.asarray([x[i] for i in rows], dtype=float))
    center = float(log_x.mean())  # the intercepts at the mean log x: nearly uncorrelated with the slope
    design = np.column_stack([log_x - center]
                             + [np.asarray([groups[i] == level for i in rows], dtype=float) for level in levels])
    log_y = np.log(np.asarray([y[i] for i in rows], dtype=float))
    kind = np.asarray([kinds[i] for i in rows])
    observed = kind == "observed"
    parameters = design.shape[1]
    if observed.sum() <= parameters or np.linalg.matrix_rank(design[observed]) < parameters:
        return None
    fitted, *_ = np.linalg.lstsq(design[observed], log_y[observed], rcond=None)
    if np.sum((log_y[observed] - design[observed] @ fitted) ** 2) <= 1e-12 * observed.sum():
        return None  # the observed points lie on the line: sigma -> 0
    # start from least squares with the censored points at their bounds: a sigma that covers them too
    start, *_ = np.linalg.lstsq(design, log_y, rcond=None)
    rss = float(np.sum((log_y - design @ start) ** 2))

    def negative(p: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient = censored_log_likelihood(p, design, log_y, kind)
        return -value, -gradient

    result = optimize.minimize(negative, np.append(start, 0.5 * math.log(rss / len(rows))), jac=True,
                               method="BFGS", options={"gtol": 1e-9, "maxiter": 1000})
    if not np.all(np.isfinite(result.x)):
        return None
    hessian, gradient = _hessian(lambda p: negative(p)[1], result.x), negative(result.x)[1]
    singular = (not np.all(np.isfinite(hessian))
                or np.min(np.linalg.eigvalsh(hessian)) <= 1e-10 * np.max(np.abs(hessian)))
    covariance = np.full(hessian.shape, np.nan) if singular else np.linalg.inv(hessian)
    # converged: the Newton step's gain g' H^-1 g / 2 is negligible (BFGS may stop on "precision loss" there)
    if (np.max(np.abs(gradient)) > 1e-6) if singular else (gradient @ covariance @ gradient > 1e-10):
        return None
    half = float(stats.norm.ppf(0.975) * math.sqrt(covariance[0, 0]))
    slope = float(result.x[0])
    intercepts = {level: float(a) - slope * center for level, a in zip(levels, result.x[1:-1])}
    return {"slope": slope, "slope_low": slope - half, "slope_high": slope + half, "sigma": math.exp(result.x[-1]),
            "intercepts": intercepts, "points": len(rows), "groups_left_out": sorted(set(groups) - keep)}


def collapse_table(runs: list[RunRecord]) -> dict[str, Any]:
    """T_c * eta across eta (per S), how T_c scales with eta and with S, and the stable-eta boundary.

    T_c here is the policy version that collapsed (collapse.py: the version of the batch at the
    collapse step; the training reward of step t is the reward of theta_{t-S}). The S and eta
    dependences are separated: a sweep's collapsing learning rates differ between S values, so a
    slope against S pooled over learning rates would carry eta's effect. T_c against S is fitted at
    each learning rate, and jointly, log T_c = a + b log eta + c log S over the runs with S > 0;
    T_c against eta at each S and with one intercept per S. A run whose collapsed version is 0 (its
    starting policy's reward was already below the threshold) counts as collapsed, but has no
    logarithm: it is left out of the fits and of the T_c * eta medians, and counted as at_version_0.
    The fits above take only the runs that collapsed; tc_vs_eta_censored fits the same within-S model
    with the runs that did not, each right-censored where a collapse would still have shown (_censored_fit).
    """
    fixed = _fixed(runs)
    collapsed = [run for run in fixed if run.collapse_version is not None]
    timed = [run for run in collapsed if run.collapse_version > 0]  # the ones with a log T_c
    by_s: dict[int, dict[str, Any]] = {}
    for s in sorted({run.staleness for run in fixed}):
        at_s = [run for run in fixed if run.staleness == s]
        hit = [run for run in at_s if run.collapse_version is not None]
        timed_s = [run for run in hit if run.collapse_version > 0]
        stable_lrs = sorted({run.lr for run in at_s} - {run.lr for run in hit})
        collapsing_lrs = sorted({run.lr for run in hit})
        largest_stable = max([lr for lr in stable_lrs if not collapsing_lrs or lr < min(collapsing_lrs)], default=None)
        tc_eta = [run.collapse_version * run.lr for run in timed_s]
        by_s[s] = {
            "largest_stable_lr": largest_stable,
            "smallest_collapsing_lr": min(collapsing_lrs, default=None),
            "collapsed": len(hit),
            "at_version_0": len(hit) - len(timed_s),
            "tc_eta": _estimate(tc_eta, "T_c * eta over collapsed runs").to_dict() if tc_eta else None,
            "tc_vs_eta": _fit_dict(fit_loglog([run.lr for run in timed_s], [run.collapse_version for run in timed_s])),
        }
    by_lr = {}
    for lr in sorted({run.lr for run in timed if run.staleness > 0}):
        at_lr = sorted((run for run in timed if run.lr == lr and run.staleness > 0), key=lambda run: run.staleness)
        by_lr[f"{lr:g}"] = {
            "tc": {str(run.staleness): run.collapse_version for run in at_lr},
            "tc_vs_s": _fit_dict(fit_loglog([run.staleness for run in at_lr], [run.collapse_version for run in at_lr])),
        }
    stale = [run for run in timed if run.staleness > 0]
    joint = fit_log_linear({"eta": [run.lr for run in stale], "S": [run.staleness for run in stale]}, None,
                           [run.collapse_version for run in stale])
    within_s = fit_log_linear({"eta": [run.lr for run in timed]}, [run.staleness for run in timed],
                              [run.collapse_version for run in timed])
    # T_c = 1 is a floor (no run collapses sooner), so those runs pull the slope toward 0: the same fit without them
    resolved = [run for run in timed if run.collapse_version >= 2]
    within_s_resolved = fit_log_linear({"eta": [run.lr for run in resolved]}, [run.staleness for run in resolved],
                                       [run.collapse_version for run in resolved])
    censored = _censored_fit(timed, [run for run in fixed if run.collapse_version is None])
    boundary = {s: row["largest_stable_lr"] for s, row in by_s.items() if row["largest_stable_lr"]}
    return {
        "by_staleness": by_s,
        "by_lr": by_lr,
        # log T_c = a_S + b log eta: the eta exponent within each S, one intercept per S.
        "tc_vs_eta": None if within_s is None else {
            **within_s["slopes"]["eta"], "points": within_s["points"],
            "how": "log T_c on log eta with one intercept per S, collapsed runs with T_c > 0"},
        "tc_vs_eta_past_first_update": None if within_s_resolved is None else {
            **within_s_resolved["slopes"]["eta"], "points": within_s_resolved["points"],
            "how": "the same without the runs at the floor T_c = 1 (collapsed on their first update)"},
        # the same model with the runs that did not collapse, censored where a collapse would still have shown
        "tc_vs_eta_censored": censored,
        # log T_c = a + b log eta + c log S over S > 0: the S exponent at a fixed eta (and b beside it).
        "tc_vs_s": None if joint is None else {
            **joint["slopes"]["S"], "eta_slope": joint["slopes"]["eta"], "points": joint["points"],
            "how": "log T_c on log eta and log S jointly, collapsed runs with S > 0 and T_c > 0"},
        "largest_stable_lr_vs_s": _fit_dict(fit_loglog([s for s in boundary if s > 0],
                                                       [boundary[s] for s in boundary if s > 0])),
    }


def _censored_fit(timed: list[RunRecord], survived: list[RunRecord]) -> dict[str, Any] | None:
    """log T_c = a_S + b log eta + sigma * eps over the collapsed runs (T_c > 0) and the runs that did not
    collapse, each of those right-censored at censoring_version: T_c beyond it. Leaving them out keeps
    only the fast collapses at the smaller learning rates, which biases b."""
    survived = [run for run in survived if censoring_version(run) >= 1]  # T_c > 0 says nothing
    # The version grid cannot show a collapse before the first update, so T_c = 1 says T_c <= 1
    # (left-censored), not T_c = 1: read as exact, the floor pulls the slope toward 0.
    kinds: list[Censoring] = [("left" if run.collapse_version == 1 else "observed") for run in timed]
    fit = fit_censored_loglog([run.lr for run in timed + survived], [run.staleness for run in timed + survived],
                              [run.collapse_version for run in timed] + [censoring_version(run) for run in survived],
                              kinds + ["right"] * len(survived))
    if fit is None:
        return None
    left_out = set(fit["groups_left_out"])
    return {
        **{key: fit[key] for key in ("slope", "slope_low", "slope_high", "sigma", "points")},
        "collapsed": sum(run.staleness not in left_out for run in timed),
        "at_floor": sum(run.staleness not in left_out and run.collapse_version == 1 for run in timed),
        "censored": sum(run.staleness not in left_out for run in survived),
        "s_left_out": fit["groups_left_out"],
        "how": "maximum likelihood, log T_c = a_S + b log eta + sigma * eps (normal): collapsed runs by their "
               "density, those at T_c = 1 as T_c <= 1, runs that did not collapse as T_c > the newest version "
               "they saw less collapse.min_tail - 1 (a later collapse would not be confirmed); S values with no "
               "collapse past T_c = 1 left out (s_left_out); 95% interval from "
               "the observed information (finite-difference Hessian)",
    }


def _fit_dict(fit: LogLogFit | None) -> dict[str, Any] | None:
    return fit.to_dict() if fit else None


HORIZON = "horizon (cumulative drift at T reaches R_crit)"
STALE = "stale-rollout (first-cycle drift at S reaches R_batch)"


@dataclass(frozen=True)
class Advice:
    staleness: int
    horizon: int
    boundary_lr: float | None  # the predicted largest stable eta: the smaller of the two limits
    boundary_low: float | None  # the same at the least and the most favourable ends of the radii's spreads
    boundary_high: float | None
    recommended_lr: float | None  # safety * boundary: the law says eta << the bound
    active: str | None  # HORIZON or STALE; None when S > 0 and the stale-rollout limit is unknown
    batch_limit: float | None
    horizon_limit: float | None
    # The law's ballistic form min{R_batch / (S G_upd), R_crit / (T G_upd)} with the same radii and
    # the median G_upd: what the prediction would be if every update pointed the same way.
    ballistic_lr: float | None
    missing: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LawConstants:
    g_upd: Estimate | None
    r_crit: Estimate | None
    r_batch: Estimate | None


def law_constants(runs: list[RunRecord]) -> LawConstants:
    return LawConstants(estimate_g_upd(runs), estimate_r_crit(runs), estimate_r_batch(runs))


def advise(runs: list[RunRecord], constants: LawConstants, staleness: int, horizon: int,
           safety: float = 0.5) -> Advice:
    """The predicted largest stable learning rate for (S, T) from the runs' measured drifts and radii."""
    r_crit, r_batch, g_upd = constants.r_crit, constants.r_batch, constants.g_upd
    cumulative = fit_drift(runs, "cumulative", horizon)
    cycle = fit_drift(runs, "first-cycle", staleness) if staleness > 0 else None
    missing = []
    if cumulative is None:
        missing.append("the drift: no run that did not collapse (add a run at a small learning rate)")
    elif cumulative.assumed_slope:
        missing.append("the drift's growth with eta: one stable learning rate, so drift ~ eta is assumed "
                       "(add a second one)")
    if r_crit is None:
        missing.append("R_crit: no run that collapsed after its first cycle and its second update (run a probe "
                       "at a large learning rate until it collapses)")
    if staleness > 0 and r_batch is None:
        missing.append("R_batch: no run with S > 0 that collapsed after its second update")
    for name, estimate in (("R_crit", r_crit), ("R_batch", r_batch if staleness > 0 else None)):
        if estimate is not None and estimate.count == 1:
            missing.append(f"{name}'s spread: it rests on one collapsed run (a second large learning rate adds one)")
    if staleness > 0 and cumulative is not None and cycle is None:
        missing.append(f"the first-cycle drift: no stable run of at least S = {staleness} steps")
    for fit in (cumulative, cycle):
        if fit is not None and fit.slope <= 0:  # noise across too close learning rates: no limit to read off
            missing.append(f"the {fit.what}: it does not grow with eta over the stable runs (exponent {fit.slope:.2f})")
    cumulative, cycle = (fit if fit is not None and fit.slope > 0 else None for fit in (cumulative, cycle))
    limits: dict[str, tuple[float, float, float]] = {}
    if cumulative is not None and r_crit is not None:
        limits[HORIZON] = tuple(cumulative.lr_at(r) for r in (r_crit.value, r_crit.low, r_crit.high))
    if cycle is not None and r_batch is not None:
        limits[STALE] = tuple(cycle.lr_at(r) for r in (r_batch.value, r_batch.low, r_batch.high))
    ballistic = None
    if g_upd is not None and r_crit is not None:
        ballistic = r_crit.value / (horizon * g_upd.value)
        if staleness > 0 and r_batch is not None:
            ballistic = min(ballistic, r_batch.value / (staleness * g_upd.value))
    if not limits:
        return Advice(staleness, horizon, None, None, None, None, None, None, None, ballistic, missing)
    active: str | None = min(limits, key=lambda name: limits[name][0])
    value = limits[active][0]
    if staleness > 0 and STALE not in limits:
        active = None  # the horizon limit alone: an upper bound, as the stale-rollout one may be lower
    return Advice(
        staleness=staleness, horizon=horizon, boundary_lr=value,
        boundary_low=min(v[1] for v in limits.values()), boundary_high=min(v[2] for v in limits.values()),
        recommended_lr=safety * value, active=active,
        batch_limit=limits[STALE][0] if STALE in limits else None,
        horizon_limit=limits[HORIZON][0] if HORIZON in limits else None,
        ballistic_lr=ballistic, missing=missing,
    )


def law_report(runs: list[RunRecord], staleness: list[int], horizon: int, clip_threshold: float = 0.05,
               safety: float = 0.5) -> dict[str, Any]:
    too_short = [run for run in runs if run.too_short_to_judge]  # "stable" only for want of steps
    runs = [run for run in runs if not run.too_short_to_judge]
    constants = law_constants(runs)
    onset = clip_onset_drift(runs, clip_threshold)
    drift_fits = {f"T={horizon}": fit_drift(runs, "cumulative", horizon)}
    drift_fits |= {f"S={s}": fit_drift(runs, "first-cycle", s) for s in staleness if s > 0}
    fixed = _fixed(runs)
    return {
        "runs": len(fixed),  # the fixed-learning-rate runs every estimate below comes from
        "steps_run": sum(len(run.metrics) for run in fixed),  # the compute the constants cost, in learner steps
        "stabilizer_runs_left_out": len(runs) - len(fixed),
        "too_short_left_out": len(too_short),  # fewer steps than collapse.min_tail: undecided
        "g_upd": constants.g_upd.to_dict() if constants.g_upd else None,
        "r_crit": constants.r_crit.to_dict() if constants.r_crit else None,
        "r_batch": constants.r_batch.to_dict() if constants.r_batch else None,
        "clip_onset_drift": onset.to_dict() if onset else None,
        "drift_fits": {key: fit.to_dict() if fit else None for key, fit in drift_fits.items()},
        "collapse": collapse_table(runs),
        "advice": [advise(runs, constants, s, horizon, safety).to_dict() for s in staleness],
    }
