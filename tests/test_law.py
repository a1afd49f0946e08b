"""The lab's fits and estimators on synthetic data with known answers."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stalerl.lab.bias import linear_regime_end, pairwise_bias, BiasPoint
from stalerl.lab.law import HORIZON, STALE, advise, collapse_table, fit_drift, fit_loglog, law_constants
from stalerl.lab.runs import RunRecord


def synthetic_run(staleness, lr, steps, c=300.0, beta=1.0, alpha=1.0, r_crit=10.0, r_batch=float("inf")):
    """A run that moves along one line, ||theta_t - theta_0|| = c * lr^beta * t^alpha, and collapses
    at the first version whose cumulative drift reaches r_crit or whose within-cycle drift reaches
    r_batch; its reward shows it S steps later (the batch of step t was sampled S versions back)."""
    drift = [c * lr**beta * t**alpha for t in range(steps + 1)]  # drift[t]: theta_t
    version = next((t for t in range(1, steps + 1) if drift[t] >= r_crit
                    or staleness and drift[t] - drift[max(t - staleness, 0)] >= r_batch), None)
    collapse = version + staleness if version is not None and version + staleness < steps - 10 else None
    metrics, path = [], 0.0
    for step in range(steps):  # the metrics of step t describe theta_{t+1}
        update = drift[step + 1] - drift[step]
        path += update
        metrics.append({"step": step, "g_upd": update / lr, "update_norm": update, "path_length": path,
                        "drift": drift[step + 1],
                        "cycle_drift": drift[step + 1] - drift[max(step + 1 - staleness, 0)] if staleness else None,
                        "clip_frac": 0.0, "train_reward": 0.0 if collapse is not None and step >= collapse else 0.3})
    config = {"staleness": {"staleness": staleness}, "optim": {"lr": lr}, "seed": 0, "stabilizer": {}}
    summary = {"collapse_step": collapse, "collapse_version": version if collapse is not None else None,
               "steps": steps}
    return RunRecord(Path("."), config, summary, metrics)


LRS = list(np.geomspace(1e-5, 1e-2, 19))  # a fine grid: the collapsed versions bracket the radii tightly


def test_fit_loglog_recovers_a_planted_exponent():
    rng = np.random.default_rng(0)
    x = np.geomspace(1, 64, 12)
    y = 0.3 * x**1.0 * np.exp(rng.normal(0, 0.05, x.size))
    fit = fit_loglog(list(x), list(y))
    assert fit.slope_low < 1.0 < fit.slope_high and abs(fit.slope - 1.0) < 0.05
    assert fit_loglog([1.0], [2.0]) is None


def test_ballistic_drift_gives_the_laws_horizon_limit():
    """Every update lr * c along one line: the advice is the law's R_crit / (T G_upd), G_upd = c."""
    runs = [synthetic_run(s, lr, 300) for s in (0, 4) for lr in LRS]
    constants = law_constants(runs)
    assert constants.g_upd.value == pytest.approx(300.0)
    assert constants.r_crit.value == pytest.approx(10.0, rel=0.2)  # drift of the first version past 10
    table = collapse_table(runs)
    # T_c = R_crit / (eta G_upd): T_c * eta is constant and T_c ~ eta^-1.
    assert table["by_staleness"][0]["tc_eta"]["value"] == pytest.approx(10.0 / 300.0, rel=0.2)
    assert table["tc_vs_eta_all"]["slope"] == pytest.approx(-1.0, abs=0.05)
    advice = advise(runs, constants, staleness=0, horizon=300)
    assert advice.active == HORIZON
    law = 10.0 / (300 * 300.0)
    assert advice.boundary_lr == pytest.approx(law, rel=0.2)
    assert advice.ballistic_lr == pytest.approx(advice.boundary_lr, rel=0.01)  # the two readings agree here
    assert advice.recommended_lr == pytest.approx(advice.boundary_lr / 2)
    assert table["by_staleness"][0]["largest_stable_lr"] <= law * 1.05


def test_diffusive_drift_sublinear_in_eta_is_measured_not_assumed():
    """Drift ~ eta^0.5 t^0.5: the advice reads the exponent off the stable runs and finds the boundary."""
    runs = [synthetic_run(0, lr, 200, c=10.0, beta=0.5, alpha=0.5, r_crit=3.0) for lr in LRS]
    constants = law_constants(runs)
    truth = (3.0 / (10.0 * 200**0.5)) ** 2  # c * eta^0.5 * T^0.5 = R_crit
    fit = fit_drift(runs, "cumulative", 200)
    assert fit.slope == pytest.approx(0.5, abs=0.01) and not fit.assumed_slope
    advice = advise(runs, constants, staleness=0, horizon=200)
    assert advice.boundary_lr == pytest.approx(truth, rel=0.25)


def test_a_horizon_past_the_runs_is_reached_by_their_drift_growth():
    runs = [synthetic_run(0, lr, 100, c=100.0, alpha=0.5, r_crit=3.0) for lr in LRS]
    advice = advise(runs, law_constants(runs), staleness=0, horizon=400)
    assert advice.boundary_lr == pytest.approx(3.0 / (100.0 * 400**0.5), rel=0.2)  # half the T=100 value


def test_stale_rollout_regime_is_active_at_large_s():
    runs = [synthetic_run(16, lr, 100, r_crit=1e6, r_batch=0.5) for lr in LRS]
    constants = law_constants(runs)
    # Read at the collapsed version, the first past the radius: high by at most one step's drift.
    assert 0.5 <= constants.r_batch.value <= 0.5 * 1.3
    advice = advise(runs, constants, staleness=16, horizon=100)
    assert advice.active == STALE
    assert advice.boundary_lr == pytest.approx(0.5 / (16 * 300.0), rel=0.3)  # the law's R_batch / (S G_upd)
    assert any(m.startswith("R_crit") for m in advice.missing)


def test_a_probe_with_one_stable_rate_assumes_drift_proportional_to_eta_and_says_so():
    runs = [synthetic_run(0, lr, 300) for lr in (1e-4, 1e-3)]  # one stable, one collapsing
    advice = advise(runs, law_constants(runs), staleness=0, horizon=300)
    assert advice.boundary_lr == pytest.approx(10.0 / (300 * 300.0), rel=0.2)
    assert any("assumed" in m for m in advice.missing)
    shrinking = [synthetic_run(0, 1e-4, 300), synthetic_run(0, 2e-4, 300, c=100.0), *runs[1:]]  # drift 9, then 6
    flat = advise(shrinking, law_constants(shrinking), staleness=0, horizon=300)
    assert flat.boundary_lr is None and any("does not grow with eta" in m for m in flat.missing)
    nothing = advise([synthetic_run(4, 1e-2, 100)], law_constants([synthetic_run(4, 1e-2, 100)]), 4, 100)
    assert nothing.boundary_lr is None and any(m.startswith("the drift") for m in nothing.missing)


def test_pairwise_bias_finds_a_planted_bias_under_noise():
    torch.manual_seed(0)
    dimension, batches = 2000, 32
    bias = torch.zeros(dimension)
    bias[:10] = 0.1  # ||b|| = 0.316
    noise_scale = 0.05  # per coordinate: ||noise|| ~ 2.2, seven times the bias
    estimates, covered = [], 0
    for _ in range(40):
        diffs = bias + noise_scale * torch.randn(batches, dimension)
        estimate, se, naive = pairwise_bias(diffs)
        estimates.append(estimate)
        covered += abs(estimate - 0.1) <= 1.96 * se
        assert naive > estimate  # the naive estimate carries trace(Cov)/M on top
    assert np.mean(estimates) == pytest.approx(0.1, rel=0.1)  # unbiased for ||b||^2 = 0.1
    assert covered >= 32  # roughly 95% coverage of the interval (>= 80% of 40)


def test_linear_regime_end():
    def point(lag, norm):
        return BiasPoint(1e-3, 32, lag, norm**2, 1e-8, norm, norm, norm, 1e-4, False, norm, 0.0, 8)
    points = [point(1, 0.04), point(2, 0.08), point(4, 0.16), point(8, 0.30), point(16, 0.31)]
    assert linear_regime_end(points) == 8
