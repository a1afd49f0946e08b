"""The lab's fits and estimators on synthetic data with known answers."""

from pathlib import Path

import numpy as np
import pytest
import torch

from stalerl.lab.bias import BiasPoint, fit_bias_power, fit_exponents, linear_regime_end, pairwise_bias
from stalerl.lab.law import (HORIZON, STALE, advise, clip_onset_drift, collapse_table, estimate_g_upd,
                             fit_censored_loglog, fit_drift, fit_log_linear, fit_loglog, first_crossing_drift,
                             law_constants)
from stalerl.lab.runs import RunRecord, censoring_version, load_run


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
    assert table["tc_vs_eta"]["slope"] == pytest.approx(-1.0, abs=0.05)  # within S
    past_first = table["tc_vs_eta_past_first_update"]
    assert past_first["slope"] == pytest.approx(-1.0, abs=0.05) and past_first["points"] <= table["tc_vs_eta"]["points"]
    assert table["tc_vs_s"] is None  # one S > 0: no S exponent to fit
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


def collapsed_record(staleness, lr, version, stabilizer=None):
    """A run known only by its summary: collapsed at policy `version` (None: did not)."""
    config = {"staleness": {"staleness": staleness}, "optim": {"lr": lr}, "seed": 0, "stabilizer": stabilizer or {}}
    summary = {"collapse_step": None if version is None else version + staleness, "collapse_version": version,
               "steps": 200}
    return RunRecord(Path("."), config, summary, [])


def test_tc_against_s_is_fitted_at_fixed_eta():
    """T_c = 0.01 / eta versions at every S, and S = 16 also collapses at the smaller 5e-4: pooled over
    learning rates, T_c against S had slope 0.31 (eta's effect); at fixed eta it is 0."""
    runs = [collapsed_record(4, lr, round(0.01 / lr) if lr >= 1e-3 else None) for lr in (5e-4, 1e-3, 3e-3)]
    runs += [collapsed_record(16, lr, round(0.01 / lr)) for lr in (5e-4, 1e-3, 3e-3)]
    table = collapse_table(runs)
    assert table["tc_vs_s"]["slope"] == pytest.approx(0.0, abs=0.1)
    assert table["tc_vs_s"]["eta_slope"]["slope"] == pytest.approx(-1.0, abs=0.1)
    assert table["by_lr"]["0.001"]["tc_vs_s"]["slope"] == pytest.approx(0.0)
    assert table["by_lr"]["0.0005"]["tc_vs_s"] is None  # one S collapsed there
    assert table["tc_vs_eta"]["slope"] == pytest.approx(-1.0, abs=0.1)


def test_a_collapse_at_version_0_counts_but_has_no_logarithm():
    runs = [collapsed_record(0, 1e-4, None), collapsed_record(0, 1e-3, 0), collapsed_record(0, 3e-3, 4),
            collapsed_record(0, 1e-2, 1)]
    row = collapse_table(runs)["by_staleness"][0]
    assert row["smallest_collapsing_lr"] == 1e-3 and row["largest_stable_lr"] == 1e-4
    assert row["collapsed"] == 3 and row["at_version_0"] == 1
    assert row["tc_eta"]["count"] == 2 and row["tc_vs_eta"]["points"] == 2


def log_normal_collapses(rng, horizon=40.0, slope=-1.5, sigma=0.8):
    """Collapse times from the censored fit's own model, log T = a_S + slope log eta + sigma * eps, three
    runs per (S, eta); a run whose T passes the horizon did not collapse by then and is censored there."""
    x, groups, y, kinds = [], [], [], []
    for s, a_s in {0: -7.0, 4: -7.5, 16: -8.0}.items():
        for lr in np.geomspace(1e-4, 1e-2, 10):
            for _ in range(3):
                t = np.exp(a_s + slope * np.log(lr) + sigma * rng.normal())
                x.append(lr)
                groups.append(s)
                y.append(min(t, horizon))
                kinds.append("observed" if t <= horizon else "right")
    return x, groups, y, kinds


def test_the_censored_fit_recovers_the_slope_that_the_collapsed_runs_alone_bias():
    """At small eta only the fast collapses happen by the horizon: least squares on them is shallower than
    the truth (-1.33 here against -1.5); the censored fit's interval holds the truth, and sigma is recovered."""
    x, groups, y, kinds = log_normal_collapses(np.random.default_rng(0))
    assert kinds.count("right") == 36
    fit = fit_censored_loglog(x, groups, y, kinds)
    seen = [i for i, kind in enumerate(kinds) if kind == "observed"]
    collapsed_only = fit_log_linear({"eta": [x[i] for i in seen]}, [groups[i] for i in seen],
                                    [y[i] for i in seen])["slopes"]["eta"]["slope"]
    assert fit["slope_low"] < -1.5 < fit["slope_high"]
    assert collapsed_only > -1.5 + 0.15  # biased toward 0
    assert abs(fit["slope"] + 1.5) < abs(collapsed_only + 1.5) - 0.1
    assert fit["sigma"] == pytest.approx(0.8, rel=0.1)
    assert fit["intercepts"] == pytest.approx({0: -7.0, 4: -7.5, 16: -8.0}, abs=0.6)
    assert fit["points"] == 90 and fit["groups_left_out"] == []


def test_without_censored_points_the_censored_fit_is_least_squares():
    """The Gaussian maximum likelihood is least squares, with sigma^2 = RSS / n, and the observed information
    gives b's variance sigma^2 [(X'X)^-1]_bb: checked against the closed forms."""
    rng = np.random.default_rng(1)
    x = list(np.geomspace(1e-4, 1e-2, 8)) * 2
    groups = [0] * 8 + [16] * 8
    y = [np.exp(-6.0 - 0.5 * g / 16 - 1.2 * np.log(lr) + 0.3 * rng.normal()) for lr, g in zip(x, groups)]
    fit = fit_censored_loglog(x, groups, y, ["observed"] * 16)
    design = np.column_stack([np.log(x), np.asarray(groups) == 0, np.asarray(groups) == 16]).astype(float)
    coefficients, rss, *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    assert fit["slope"] == pytest.approx(coefficients[0], abs=1e-6)
    assert fit["slope"] == pytest.approx(fit_log_linear({"eta": x}, groups, y)["slopes"]["eta"]["slope"], abs=1e-6)
    assert fit["intercepts"] == pytest.approx({0: coefficients[1], 16: coefficients[2]}, abs=1e-6)
    assert fit["sigma"] == pytest.approx(np.sqrt(rss[0] / 16), rel=1e-6)
    half = 1.959964 * np.sqrt(rss[0] / 16 * np.linalg.inv(design.T @ design)[0, 0])
    assert fit["slope_high"] - fit["slope"] == pytest.approx(half, rel=1e-4)


def test_the_censored_fit_returns_none_where_it_has_no_maximum(monkeypatch):
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]
    noisy = [50.0, 7.0, 3.0, 2.0]
    assert fit_censored_loglog(lrs, [0] * 4, [100.0] * 4, ["right"] * 4) is None  # no collapse
    assert fit_censored_loglog([1e-3] * 4, [0] * 4, noisy, ["observed"] * 4) is None  # one eta
    assert fit_censored_loglog(lrs[:2], [0] * 2, noisy[:2], ["observed"] * 2) is None  # no residual left
    exact = [0.01 / lr for lr in lrs]  # on the line: sigma -> 0
    assert fit_censored_loglog(lrs, [0] * 4, exact, ["observed"] * 4) is None
    # an S with censored runs only has no intercept to fit: it is left out, and said to be
    fit = fit_censored_loglog(lrs + lrs, [0] * 4 + [8] * 4, noisy + [100.0] * 4, ["observed"] * 4 + ["right"] * 4)
    assert fit["groups_left_out"] == [8] and fit["points"] == 4
    # a singular information matrix: the slope stands, its interval is nan
    import stalerl.lab.law as law

    monkeypatch.setattr(law, "_hessian", lambda gradient, at: np.zeros((at.size, at.size)))
    fit = fit_censored_loglog(lrs, [0] * 4, noisy, ["observed"] * 4)
    assert np.isfinite(fit["slope"]) and np.isnan(fit["slope_low"]) and np.isnan(fit["slope_high"])


def test_collapse_table_censors_the_runs_that_did_not_collapse():
    """Stable runs enter at censoring_version (199 - S - 9 for 200 steps: a collapse in the last
    collapse.min_tail - 1 steps would not be confirmed), T_c = 1 as T_c <= 1, an S without a
    collapse past its first update is left out; no collapse at all, or only at version 0, gives None."""
    runs = [collapsed_record(0, lr, version) for lr, version in ((1e-4, None), (2e-4, None), (5e-4, 80), (7e-4, 45),
                                                                 (1e-3, 3), (3e-3, 1))]
    runs += [collapsed_record(4, lr, version) for lr, version in ((1e-4, None), (3e-4, None), (7e-4, 20), (1e-3, 4),
                                                                  (3e-3, 1))]
    runs += [collapsed_record(16, lr, version) for lr, version in ((1e-4, None), (3e-3, 1))]
    assert [censoring_version(run) for run in runs if run.collapse_version is None] == [190, 190, 186, 186, 174]
    table = collapse_table(runs)
    fit = table["tc_vs_eta_censored"]
    assert (fit["points"], fit["collapsed"], fit["at_floor"], fit["censored"], fit["s_left_out"]) == (11, 7, 2, 4, [16])
    assert fit["slope_low"] < fit["slope"] < fit["slope_high"]
    assert fit["slope"] < table["tc_vs_eta"]["slope"]  # the collapsed-only fit is shallower
    assert collapse_table([collapsed_record(0, lr, None) for lr in (1e-4, 1e-3)])["tc_vs_eta_censored"] is None
    assert collapse_table([collapsed_record(0, 1e-3, 0), collapsed_record(0, 1e-4, None)])["tc_vs_eta_censored"] is None


def test_advise_prints_the_censored_slope_and_writes_it_as_strict_json(tmp_path, capsys):
    import json

    from stalerl.lab.advice import print_report, write_report
    from stalerl.lab.law import law_report

    report = law_report([synthetic_run(s, lr, 300) for s in (0, 4) for lr in LRS], [0, 4], 300)
    fit = report["collapse"]["tc_vs_eta_censored"]
    assert fit["censored"] > 0 and fit["collapsed"] == report["collapse"]["tc_vs_eta"]["points"]
    print_report(report)
    assert f"(censored fit): {fit['slope']:.2f} [{fit['slope_low']:.2f}, {fit['slope_high']:.2f}]" in capsys.readouterr().out
    report["collapse"]["tc_vs_eta_censored"] |= {"slope_low": float("nan"), "slope_high": float("nan")}
    write_report(report, tmp_path / "advise.json")

    def no_nan(constant):
        raise AssertionError(f"{constant} in advise's JSON")

    written = json.loads((tmp_path / "advise.json").read_text(), parse_constant=no_nan)
    assert written["collapse"]["tc_vs_eta_censored"]["slope_low"] is None
    assert written["collapse"]["tc_vs_eta_censored"]["slope"] == pytest.approx(fit["slope"])


def test_g_upd_comes_from_the_fixed_learning_rate_runs_only():
    runs = [synthetic_run(0, lr, 100) for lr in (1e-4, 2e-4)]
    capped = synthetic_run(4, 1e-3, 100, c=30.0)  # a stabilizer's run: a tenth of the update size
    capped.config["stabilizer"] = {"lr_control": "staleness"}
    assert estimate_g_upd(runs + [capped]).value == pytest.approx(300.0)
    assert estimate_g_upd(runs + [capped]).count == 2


def test_clip_onset_reads_the_drift_the_clipped_step_saw():
    """The clip fraction of step t compares theta_t with data from theta_{t-S}: the gap is the cycle
    drift logged at step t - 1 (a row's geometry is after its update). Ballistic, 0.1 a step, S = 8:
    the clip fires at step 3, where the gap is 0.3."""
    staleness, theta = 8, (lambda k: 0.1 * k)
    rows = [{"step": t, "drift": theta(t + 1), "cycle_drift": theta(t + 1) - theta(max(t + 1 - staleness, 0)),
             "clip_frac": 1.0 if theta(t) - theta(max(t - staleness, 0)) > 0.25 else 0.0} for t in range(20)]
    run = RunRecord(Path("."), {"staleness": {"staleness": staleness}, "optim": {"lr": 1e-3}, "seed": 0,
                                "stabilizer": {}}, {"collapse_step": None, "steps": 20}, rows)
    assert first_crossing_drift(run, 0.5, window=1) == pytest.approx(0.3)
    for row in rows:
        row["clip_frac"] = 1.0  # clipping from step 0, at theta_0 on theta_0's data: drift 0
    assert first_crossing_drift(run, 0.5, window=1) == 0.0
    assert clip_onset_drift([run], 0.5).value == 0.0


def test_a_run_directory_is_read_with_the_current_collapse_definition(tmp_path):
    """summary.json written by the earlier definition (trailing average: step 14, version 10 at S = 4);
    the lab recomputes T_c from metrics.jsonl with the run's collapse settings: step 7, version 3."""
    import json

    import yaml

    from stalerl.config import TrainConfig, override

    config = override(TrainConfig(), {"staleness.staleness": 4, "optim.lr": 1e-3, "steps": 60})
    rows = [{"step": t, "version": max(t - 4, 0), "train_reward": 0.2 if max(t - 4, 0) < 3 else 0.0,
             "drift": 0.5 * (t + 1), "path_length": 0.5 * (t + 1), "g_upd": 500.0, "cycle_drift": 1.0}
            for t in range(60)]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"collapse_step": 14, "collapse_version": 10, "steps": 60,
                                                       "drift_at_collapse": 7.5}))
    run = load_run(tmp_path)
    assert (run.collapse_step, run.collapse_version) == (7, 3)
    assert run.summary["drift_at_collapse"] == 1.5 and run.summary["path_length_at_collapse"] == 1.5  # theta_3
    assert law_constants([run]).r_batch.value == 1.0


def test_runs_that_collapsed_on_their_first_update_give_no_radius():
    """A collapse at version 1 bounds the radii only from above by Adam's first step (set by the learning
    rate), and theta_1 was made from theta_0's own batch: neither R_crit nor R_batch uses it. G_upd is
    measured over the updates up to the collapsed version, not up to the collapse step (v + S)."""
    fast = [synthetic_run(s, 1e-2, 100, r_crit=2.0) for s in (0, 4)]  # drift 3 after one update: v = 1
    assert all(run.collapse_version == 1 for run in fast)
    constants = law_constants(fast)
    assert constants.r_crit is None and constants.r_batch is None
    slow = synthetic_run(4, 1e-3, 100, r_crit=100.0, r_batch=1.0)  # within-cycle drift 1.2 at v = 4
    assert slow.collapse_version == 4
    constants = law_constants([*fast, slow])
    assert constants.r_batch.value == pytest.approx(1.2) and constants.r_batch.count == 1
    # the updates after the collapsed version (here smaller) do not count in G_upd
    for row in slow.metrics[slow.collapse_version:]:
        row["g_upd"] = 1.0
    assert estimate_g_upd([slow]).value == pytest.approx(300.0)


def test_without_the_stale_limit_the_advice_names_no_active_constraint():
    """S > 0 and no R_batch: the horizon limit is an upper bound, not the active constraint."""
    runs = [synthetic_run(0, lr, 300) for lr in LRS]
    constants = law_constants(runs)
    assert constants.r_batch is None
    assert advise(runs, constants, staleness=0, horizon=300).active == HORIZON
    advice = advise([*runs, synthetic_run(4, 1e-5, 300)], constants, staleness=4, horizon=300)
    assert advice.active is None and advice.boundary_lr == advice.horizon_limit and advice.batch_limit is None
    assert any(line.startswith("R_batch") for line in advice.missing)


def test_a_run_too_short_for_the_collapse_rule_is_neither_stable_nor_collapsed():
    """8 steps of a policy at reward 0: the rule needs collapse.min_tail (10) steps to confirm a collapse, so
    the run was reported stable ("largest stable lr 1e+30"); it is left out of the law and counted."""
    from stalerl.lab.law import law_report

    runs = [synthetic_run(0, lr, 300) for lr in LRS]
    short = synthetic_run(0, 1e30, 8)
    for row in short.metrics:
        row["train_reward"] = 0.0
    assert short.collapse_version is None and short.too_short_to_judge
    assert not any(run.too_short_to_judge for run in runs)
    report = law_report([*runs, short], [0], 300)
    assert report["too_short_left_out"] == 1 and report["runs"] == len(runs)
    assert report["collapse"]["by_staleness"][0]["largest_stable_lr"] < 1


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


def test_fit_bias_power_recovers_an_exact_power_and_refuses_what_it_cannot_determine():
    lags = [1.0, 2.0, 4.0, 8.0]
    fit = fit_bias_power(lags, [0.01 * lag**1.5 for lag in lags], [1e-4] * 4)  # ||b|| = 0.1 S^0.75
    assert fit.slope == pytest.approx(0.75, abs=1e-6) and np.exp(fit.intercept) == pytest.approx(0.1, rel=1e-5)
    assert fit.slope_low < 0.75 < fit.slope_high and fit.chi2_per_dof == pytest.approx(0, abs=1e-8)
    two = fit_bias_power([1.0, 2.0], [0.01, 0.04], [1e-3, 1e-3])  # exactly determined: an interval from the SEs
    assert two.slope == pytest.approx(1.0, abs=1e-6) and np.isnan(two.chi2_per_dof) and two.slope_high > 1.0
    assert fit_bias_power([1.0, 2.0], [-0.01, -0.02], [1e-3, 1e-3]) is None  # nothing above 0: no exponent
    assert fit_bias_power([2.0, 2.0], [0.01, 0.02], [1e-3, 1e-3]) is None  # one x: no slope


def _probe_points(rng, truth, lags, scale, dimension=200, batches=32):
    """BiasPoints at lr 1e-4 whose paired differences are truth(S) along one direction plus noise."""
    import math

    direction = rng.standard_normal(dimension)
    direction /= np.linalg.norm(direction)
    points = []
    for lag in lags:
        diffs = truth(lag) * direction + scale * lag**0.5 * rng.standard_normal((batches, dimension)) / dimension**0.5
        estimate, se, naive = pairwise_bias(torch.from_numpy(diffs).float())
        norm, floor = math.sqrt(max(estimate, 0.0)), math.sqrt(2 * se)
        points.append(BiasPoint(1e-4, 32, lag, estimate, se, norm, norm, norm, floor, estimate < 2 * se,
                                math.sqrt(naive), 1e-4 * lag, batches))
    return points


def test_bias_exponent_is_unbiased_near_the_noise_floor_where_a_log_log_fit_of_the_norms_is_not():
    """||b|| = 0.05 S (exponent 1), with the noise floor about 1.4x the bias at S = 4: the log-log fit of the
    norms above the floor is pulled toward 0; the weighted fit of ||b||^2, every point kept, is not,
    and its interval covers 1 about as often as it says."""
    rng = np.random.default_rng(0)
    weighted, log_log, covered = [], [], 0
    for _ in range(40):
        points = _probe_points(rng, lambda lag: 0.05 * lag, [1, 2, 4, 8, 16], scale=1.5)
        fit = fit_exponents(points)["by_lr"]["0.0001"]["s_exponent"]
        if fit is not None:
            weighted.append(fit["slope"])
            covered += fit["slope_low"] <= 1.0 <= fit["slope_high"]
        above = [p for p in points if not p.below_floor]
        old = fit_loglog([p.lag for p in above], [p.bias_norm for p in above])
        if old is not None:
            log_log.append(old.slope)
    assert len(weighted) >= 32  # a few probes have no point above the floor: no regime, no fit
    assert abs(np.median(weighted) - 1.0) < 0.15
    assert np.median(log_log) < 0.85  # what the fit of the norms above the floor would have said
    assert covered >= 0.85 * len(weighted)


def test_each_anchor_has_its_own_linear_regime():
    """Two anchors whose biases differ by 2.5x at every lag, each linear up to S = 8: pooled by lag, the
    second anchor's points would read as the bend (bias / S under half the first's) and end the regime at once."""
    def point(anchor, lag, norm):
        return BiasPoint(1e-4, anchor, lag, norm**2, 1e-6, norm, norm, norm, 1e-3, False, norm, 1e-4 * lag, 8)
    points = [point(anchor, lag, scale * (lag if lag <= 8 else 6)) for anchor, scale in ((32, 0.1), (48, 0.04))
              for lag in (1, 2, 4, 8, 16)]
    fits = fit_exponents(points)
    assert fits["by_lr"]["0.0001"]["linear_regime_end"] == {"32": 8, "48": 8}
    assert fit_exponents(points, log_log=True)["by_lr"]["0.0001"]["linear_regime_end"] == {"32": 8, "48": 8}
