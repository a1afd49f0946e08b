import math

import pytest
import torch

from stalerl.config import StabilizerConfig
from stalerl.metrics import UpdateTracker
from stalerl.stabilizers import LearningRateControl, align_update


def test_staleness_control_caps_by_lag_and_running_g_upd():
    control = LearningRateControl(StabilizerConfig(lr_control="staleness", k=0.5, r_batch=0.4), base_lr=1e-3)
    assert control.choose(lag=8, batch_stats={}) == 1e-3  # no G_upd estimate yet: the base rate
    primed = LearningRateControl(StabilizerConfig(lr_control="staleness", k=0.5, r_batch=0.4), 1e-3, initial_g_upd=100)
    assert primed.choose(lag=8, batch_stats={}) == pytest.approx(0.5 * 0.4 / (8 * 100.0))  # capped from step 0
    control.observe(update_norm=0.2, lr=1e-3)  # G_upd = 200
    assert control.g_upd_hat == pytest.approx(200.0)
    assert control.choose(lag=8, batch_stats={}) == pytest.approx(0.5 * 0.4 / (8 * 200.0))
    assert control.choose(lag=0, batch_stats={}) == pytest.approx(min(1e-3, 0.5 * 0.4 / 200.0))
    control.observe(update_norm=0.1, lr=1e-4)  # G = 1000; EMA 0.9 * 200 + 0.1 * 1000
    assert control.g_upd_hat == pytest.approx(280.0)


def test_ess_control_scales_by_root_ess():
    control = LearningRateControl(StabilizerConfig(lr_control="ess"), base_lr=1e-3)
    assert control.choose(lag=3, batch_stats={"ess_frac": 0.25}) == pytest.approx(5e-4)


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
