"""Stabilizers that act on the learner's step, each a config option with its decisions logged.

* ``lr_control: staleness`` (stalerl's own): keep each update inside the paper's stale-rollout
  constraint eta * S * G_upd << R_batch by capping eta_t = min(eta, k * R_batch / (S * G_hat)), where
  S is the run's staleness (the largest lag) and G_hat a running estimate of ||d_t|| / eta_t. A batch
  of lag s is trained on up to S updates after its sampler's version, so S caps of k * R_batch / S keep
  that within-cycle drift under k * R_batch. Dividing by the batch's own lag would not: in exact mode
  the first S steps all train on theta_0's batches at lags 0, 1, .., S - 1, and their caps add up to
  k * R_batch * (1 + 1 + 1/2 + .. + 1/(S-1)) from theta_0 (4.3 k R_batch at S = 16). At S = 0 there is no
  stale rollout and no cap.
* ``lr_control: ess`` (the idea of VCPO, arXiv 2602.17616, implemented from its description):
  eta_t = eta * sqrt(ESS / N) of the sequence-level importance weights pi_theta / mu, so the step
  shrinks as the behavior data stops representing the current policy.
* ``gac_cos_threshold`` (the gradient-alignment idea of GAC, arXiv 2603.01501, from its description):
  after the optimizer step, if cos(d_t, d_{t-1}) exceeds the threshold, the component of d_t along
  d_{t-1} is shrunk until the cosine equals the threshold (the orthogonal part is kept). Assumption:
  it acts on the parameter update, not on Adam's moments, which are left as they are.
"""

from __future__ import annotations

import math

import torch

from stalerl.config import StabilizerConfig
from stalerl.metrics import UpdateTracker


class LearningRateControl:
    """Chooses eta_t for each step; `observe` feeds it the size of the update it produced."""

    def __init__(self, config: StabilizerConfig, base_lr: float, staleness: int,
                 initial_g_upd: float | None = None):
        self.config = config
        self.base_lr = base_lr
        self.staleness = staleness  # S, the largest lag a batch can have
        # Before any update is seen: a prior. For Adam, sqrt(#parameters) (its first step moves every
        # coordinate by eta), so the cap holds from step 0 instead of after a step at the full rate.
        self.g_upd_hat: float | None = initial_g_upd
        self.last_cap: float | None = None

    def choose(self, batch_stats: dict[str, float]) -> float:
        mode = self.config.lr_control
        self.last_cap = None
        if mode == "ess":
            return self.base_lr * math.sqrt(batch_stats["ess_frac"])
        if mode == "staleness" and self.staleness > 0 and self.g_upd_hat is not None:
            self.last_cap = self.config.k * self.config.r_batch / (self.staleness * self.g_upd_hat)
            return min(self.base_lr, self.last_cap)
        return self.base_lr

    def observe(self, update_norm: float, lr: float) -> None:
        g_upd = update_norm / lr
        decay = self.config.g_upd_decay
        self.g_upd_hat = g_upd if self.g_upd_hat is None else decay * self.g_upd_hat + (1 - decay) * g_upd

    def log(self) -> dict[str, float | None]:
        return {"lr_cap": self.last_cap, "g_upd_hat": self.g_upd_hat}

    def state(self) -> dict[str, float | None]:  # the running estimate, for a checkpoint
        return {"g_upd_hat": self.g_upd_hat}

    def restore(self, state: dict[str, float | None]) -> None:
        self.g_upd_hat = state["g_upd_hat"]


@torch.no_grad()
def align_update(tracker: UpdateTracker, threshold: float) -> dict[str, float | None]:
    """GAC-style projection of the update just made; returns the cosine before and after.
    It acts on the trainable parameters (their fp32 masters); config.validate refuses it with LoRA,
    whose merged update is not a vector of the adapters' coordinates."""
    previous_update = tracker.previous_update
    if previous_update is None:
        return {"gac_cos_before": None, "gac_projected": 0.0}
    update = tracker.snapshot().dense - tracker.previous.dense
    direction = previous_update.dense / previous_update.dense.norm().clamp(min=1e-30)
    along = float(update @ direction)
    orthogonal = update - along * direction
    cos_before = along / max(float(update.norm()), 1e-30)
    if cos_before <= threshold:
        return {"gac_cos_before": cos_before, "gac_projected": 0.0}
    # Keep the orthogonal part; shrink the aligned part to a' with a' / sqrt(a'^2 + |r|^2) = threshold.
    along_new = threshold * float(orthogonal.norm()) / math.sqrt(1.0 - threshold**2)
    tracker.write_dense(tracker.previous.dense + orthogonal + along_new * direction)
    return {"gac_cos_before": cos_before, "gac_projected": 1.0}
