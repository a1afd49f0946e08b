import pytest

from stalerl.collapse import collapse_step, collapse_summary, moving_average


def test_moving_average_is_trailing():
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]


def test_collapse_step_known_curves():
    rising = [0.1 + 0.001 * t for t in range(100)]
    assert collapse_step(rising, window=5, threshold=0.02, min_tail=5) is None
    collapsed = [0.2] * 40 + [0.0] * 60
    # The trailing mean of 5 confirms it at step 44; T_c is the first step of the stretch it confirms.
    assert collapse_step(collapsed, window=5, threshold=0.02, min_tail=5) == 40
    # A dip that recovers is not a collapse; a final dip shorter than min_tail is censored.
    dip = [0.2] * 40 + [0.0] * 20 + [0.2] * 40
    assert collapse_step(dip, window=5, threshold=0.02, min_tail=5) is None
    late = [0.2] * 95 + [0.0] * 8
    assert collapse_step(late, window=5, threshold=0.02, min_tail=10) is None
    assert collapse_step(late, window=5, threshold=0.02, min_tail=8) == 95  # the tail counts from T_c
    assert collapse_step([], window=5, threshold=0.02, min_tail=1) is None


def test_a_batch_above_the_threshold_ends_the_collapsed_stretch():
    # Falling at step 30, one lucky batch at step 33: the stretch the average confirms starts after it.
    rewards = [0.2] * 30 + [0.0, 0.0, 0.0, 0.06] + [0.0] * 40
    assert collapse_step(rewards, window=10, threshold=0.05, min_tail=10) == 34
    assert collapse_step([0.0] * 20, window=10, threshold=0.05, min_tail=10) == 0  # collapsed from the start


def exact_lag_rewards(staleness: int, broken_version: int, steps: int = 120) -> list[float]:
    """The training reward of an exact-lag run whose policy breaks at `broken_version`: step t shows the
    reward of theta_{max(t - S, 0)}."""
    return [0.2 if max(t - staleness, 0) < broken_version else 0.0 for t in range(steps)]


@pytest.mark.parametrize("broken_version", [1, 3, 8, 40])
def test_the_collapsed_version_is_the_same_at_every_staleness(broken_version):
    """The trailing average alone crossed late by an amount that depended on S (partial windows at
    the start): at version 3 it said 10 at S = 0 and 10 at S = 4 and 16, at version 1 it said 4 and 8."""
    for staleness in (0, 1, 4, 16):
        history = [{"train_reward": reward, "version": max(t - staleness, 0), "drift": 0.5 * (t + 1),
                    "path_length": 0.5 * (t + 1), "g_upd": 100.0}
                   for t, reward in enumerate(exact_lag_rewards(staleness, broken_version))]
        summary = collapse_summary(history, window=10, threshold=0.05, min_tail=10)
        assert summary["collapse_step"] == broken_version + staleness
        assert summary["collapse_version"] == broken_version
        assert summary["path_length_at_collapse"] == pytest.approx(0.5 * broken_version)
        assert summary["drift_at_collapse"] == pytest.approx(0.5 * broken_version)  # of theta_v, R_crit's reading


def test_collapse_summary_of_a_run_that_did_not_collapse_or_collapsed_at_step_0():
    history = [{"train_reward": 0.3, "version": t, "drift": 1.0, "path_length": 1.0, "g_upd": float(t)}
               for t in range(30)]
    assert collapse_summary(history, 10, 0.05, 10) == {
        "collapse_step": None, "collapse_version": None, "drift_at_collapse": None,
        "path_length_at_collapse": None, "g_upd_median": 14.5}
    for row in history:
        row["train_reward"] = 0.0
    summary = collapse_summary(history, 10, 0.05, 10)
    assert summary["collapse_step"] == 0 and summary["collapse_version"] == 0
    assert summary["path_length_at_collapse"] == 0.0 and summary["g_upd_median"] == 0.0  # the first update's


@pytest.mark.parametrize("broken_version", [None, 0, 3])
def test_collapse_summary_is_what_train_writes(broken_version):
    """The lab recomputes these fields of summary.json for runs on disk; train.summarize writes them."""
    from stalerl.config import TrainConfig, override
    from stalerl.train import summarize

    config = override(TrainConfig(), {"staleness.staleness": 4, "steps": 60})
    history = [{"step": t, "version": max(t - 4, 0), "val_reward": None, "lag_max": min(t, 4),
                "train_reward": 0.2 if broken_version is None or max(t - 4, 0) < broken_version else 0.0,
                "drift": 0.5 * (t + 1), "path_length": 0.6 * (t + 1), "g_upd": None if t == 2 else 100.0 + t}
               for t in range(60)]
    written = summarize(config, history, 0.2, {}, 0.0)
    recomputed = collapse_summary(history, config.collapse.window, config.collapse.threshold, config.collapse.min_tail)
    assert recomputed == {key: written[key] for key in recomputed}
