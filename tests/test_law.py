"""The lab's fits and estimators on synthetic data with known answers."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stalerl.lab.bias import linear_regime_end, pairwise_bias, BiasPoint
from stalerl.lab.law import advise, collapse_table, estimate_g_upd, estimate_r_batch, estimate_r_crit, fit_loglog
from stalerl.lab.runs import RunRecord


def synthetic_run(staleness, lr, steps, g_upd=200.0, r_crit=10.0, r_batch=None):
    """A run whose updates have size lr * g_upd; it collapses when the path length reaches r_crit."""
    collapse = math.ceil(r_crit / (lr * g_upd)) if r_crit / (lr * g_upd) < steps else None
    metrics, path = [], 0.0
    for step in range(steps):
        path += lr * g_upd
        cycle = min(step, staleness) * lr * g_upd if staleness else None
        clip = 0.2 if (r_batch is not None and cycle is not None and cycle >= r_batch) else 0.0
        metrics.append({"step": step, "g_upd": g_upd, "path_length": path, "cycle_drift": cycle, "clip_frac": clip,
                        "train_reward": 0.0 if collapse is not None and step >= collapse else 0.3})
    config = {"staleness": {"staleness": staleness}, "optim": {"lr": lr}, "seed": 0, "stabilizer": {}}
    summary = {"collapse_step": collapse, "steps": steps}
    return RunRecord(Path("."), config, summary, metrics)


def test_fit_loglog_recovers_a_planted_exponent():
    rng = np.random.default_rng(0)
    x = np.geomspace(1, 64, 12)
    y = 0.3 * x**1.0 * np.exp(rng.normal(0, 0.05, x.size))
    fit = fit_loglog(list(x), list(y))
    assert fit.slope_low < 1.0 < fit.slope_high and abs(fit.slope - 1.0) < 0.05
    assert fit_loglog([1.0], [2.0]) is None


def test_horizon_regime_constants_and_advice():
    runs = [synthetic_run(s, lr, 300) for s in (0, 4) for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
    assert estimate_g_upd(runs).value == pytest.approx(200.0)
    r_crit = estimate_r_crit(runs)
    assert r_crit.value == pytest.approx(10.0, rel=0.1) and r_crit.count == 6  # lr >= 3e-4 collapse, two S
    table = collapse_table(runs)
    # T_c = R_crit / (eta G_upd): T_c * eta is constant and T_c ~ eta^-1.
    assert table["by_staleness"][0]["tc_eta"]["value"] == pytest.approx(10.0 / 200.0, rel=0.1)
    assert table["tc_vs_eta_all"]["slope"] == pytest.approx(-1.0, abs=0.05)
    assert table["by_staleness"][0]["largest_stable_lr"] == 1e-4
    advice = advise(estimate_g_upd(runs), estimate_r_crit(runs), None, staleness=0, horizon=300)
    assert advice.active.startswith("horizon")
    assert advice.boundary_lr == pytest.approx(10.0 / (300 * 200.0), rel=0.1)  # between 1e-4 and 3e-4
    assert advice.recommended_lr == pytest.approx(advice.boundary_lr / 2)


def test_stale_rollout_regime_is_active_at_large_s():
    runs = [synthetic_run(16, lr, 100, r_crit=1e6, r_batch=0.5) for lr in (2e-4, 5e-4, 1e-3)]
    r_batch = estimate_r_batch(runs)
    assert r_batch.value == pytest.approx(0.5, rel=0.3)
    g_upd, r_crit = estimate_g_upd(runs), None
    advice = advise(g_upd, r_crit, r_batch, staleness=16, horizon=100)
    assert advice.active.startswith("stale-rollout")
    assert advice.boundary_lr == pytest.approx(r_batch.value / (16 * 200.0))
    assert any(m.startswith("R_crit") for m in advice.missing)
    nothing = advise(None, None, None, staleness=4, horizon=100)
    assert nothing.boundary_lr is None and len(nothing.missing) == 3


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
