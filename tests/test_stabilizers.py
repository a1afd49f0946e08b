import math

import pytest
import torch

from stalerl.config import StabilizerConfig
from stalerl.metrics import UpdateTracker
from stalerl.stabilizers import LearningRateControl, align_update


def test_staleness_control_caps_by_staleness_and_running_g_upd():
    config = StabilizerConfig(lr_control="staleness", k=0.5, r_batch=0.4)
    control = LearningRateControl(config, base_lr=1e-3, staleness=8)
    assert control.choose(batch_stats={}) == 1e-3  # no G_upd estimate yet: the base rate
    primed = LearningRateControl(config, 1e-3, staleness=8, initial_g_upd=100)
    assert primed.choose(batch_stats={}) == pytest.approx(0.5 * 0.4 / (8 * 100.0))  # capped from step 0
    control.observe(update_norm=0.2, lr=1e-3)  # G_upd = 200
    assert control.g_upd_hat == pytest.approx(200.0)
    assert control.choose(batch_stats={}) == pytest.approx(0.5 * 0.4 / (8 * 200.0))
    assert control.log() == {"lr_cap": pytest.approx(0.5 * 0.4 / (8 * 200.0)), "g_upd_hat": pytest.approx(200.0)}
    control.observe(update_norm=0.1, lr=1e-4)  # G = 1000; EMA 0.9 * 200 + 0.1 * 1000
    assert control.g_upd_hat == pytest.approx(280.0)
    on_policy = LearningRateControl(config, 1e-3, staleness=0, initial_g_upd=100)
    assert on_policy.choose(batch_stats={}) == 1e-3 and on_policy.log()["lr_cap"] is None  # no stale rollout


@pytest.mark.parametrize("staleness", [1, 4, 16])
def test_staleness_control_keeps_every_within_cycle_drift_under_k_r_batch(staleness):
    """Exact mode, updates of eta_t * G_upd along one direction (the law's ballistic case): the drift from
    each batch's sampler to the weights it is trained at stays under k * R_batch, the first cycle included,
    where every batch comes from theta_0 (a cap by the batch's own lag let it reach 4.3 k R_batch at S = 16)."""
    config, g_upd = StabilizerConfig(lr_control="staleness", k=0.5, r_batch=0.9), 300.0
    control = LearningRateControl(config, base_lr=1.0, staleness=staleness, initial_g_upd=g_upd)
    position = [0.0]  # theta_t along the update direction
    for step in range(3 * staleness + 5):
        version = max(step - staleness, 0)
        assert position[step] - position[version] <= config.k * config.r_batch * (1 + 1e-9)
        lr = control.choose(batch_stats={})
        control.observe(update_norm=lr * g_upd, lr=lr)
        position.append(position[step] + lr * g_upd)
    assert position[-1] - position[-1 - staleness] == pytest.approx(config.k * config.r_batch)  # the cap binds


def test_ess_control_scales_by_root_ess():
    control = LearningRateControl(StabilizerConfig(lr_control="ess"), base_lr=1e-3, staleness=3)
    assert control.choose(batch_stats={"ess_frac": 0.25}) == pytest.approx(5e-4)


def test_gac_projection_caps_the_cosine_and_keeps_the_orthogonal_part():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0]]))
    tracker = UpdateTracker(model, staleness=0)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0]]))  # d_0 = (1, 0)
    tracker.after_step(model)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.5]]))  # d_1 = (2, 0.5): cos = 0.97
    info = align_update(tracker, threshold=0.8)
    assert info["gac_projected"] == 1.0 and info["gac_cos_before"] == pytest.approx(2 / math.hypot(2, 0.5))
    update = model.weight.detach()[0] - torch.tensor([1.0, 0.0])
    assert update[1].item() == pytest.approx(0.5)  # orthogonal part kept
    assert (update[0] / update.norm()).item() == pytest.approx(0.8)  # cosine now at the threshold
    low = align_update(tracker, threshold=0.9)  # already below: untouched
    assert low["gac_projected"] == 0.0
