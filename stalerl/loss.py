"""The GRPO surrogate with an explicit behavior policy (science.md, 'The surrogate').

Pure functions of tensors. Shape suffixes: P prompts, G samples per prompt, N = P*G sequences,
L response positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token_mean", "sequence_mean", "constant"]
Objective = Literal["clipped", "decoupled"]


def group_advantages(rewards_P_G: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean R) / (std R + eps) within each group; Dr. GRPO drops the division.

    std is the sample standard deviation (n - 1), as in DeepSeekMath's GRPO and TRL.
    A group whose rewards are all equal gets exactly zero advantages: it carries no signal. (The
    float mean of 8 x 0.7 is not 0.7, and dividing that rounding error by std + eps ~ 1e-6 would
    give the whole group one sign.)
    """
    centered_P_G = rewards_P_G - rewards_P_G.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered_P_G = centered_P_G / (rewards_P_G.std(dim=1, keepdim=True) + eps)
    signal_P_1 = rewards_P_G.amax(dim=1, keepdim=True) > rewards_P_G.amin(dim=1, keepdim=True)
    return centered_P_G * signal_P_1


@dataclass(frozen=True)
class LossStats:
    clip_frac: float  # fraction of response tokens whose gradient the clip removed
    kl_behavior: float  # k3 estimate of KL(behavior || current) on the behavior samples
    kl_ref: float  # k3 estimate of KL(current || reference); 0 when no reference is used
    ratio_mean: float
    ratio_max: float
    truncated_frac: float  # 'decoupled' with is_cap: fraction of tokens whose weight pi_prox / mu was capped


def _masked_mean(values_N_L: torch.Tensor, mask_N_L: torch.Tensor) -> torch.Tensor:
    return (values_N_L * mask_N_L).sum() / mask_N_L.sum().clamp(min=1)


def grpo_loss(
    logprobs_N_L: torch.Tensor,
    behavior_logprobs_N_L: torch.Tensor,
    advantages_N: torch.Tensor,
    mask_N_L: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "token_mean",
    constant_normalizer: float = 0.0,
    ref_logprobs_N_L: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    objective: Objective = "clipped",
    is_cap: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = pi_theta / mu.

    objective 'decoupled' (decoupled PPO, as AReaL runs stale rollouts): the clip acts on
    r = pi_theta / pi_prox, with the proximal policy the learner's own weights at this step (theta_t,
    one update a batch), and the behavior policy enters as a constant weight w = pi_prox / mu,
    truncated at `is_cap` when it is > 0 (truncated importance sampling): -w min(r A, clip(r) A).
    At theta_t, r = 1, so the gradient is -w A grad log pi_theta: stale tokens keep a (bounded)
    gradient where the plain clip on pi_theta / mu would remove it.

    `behavior_logprobs_N_L` are log mu(y_t | x, y_<t), recorded when the rollout was sampled by the
    (possibly stale) policy; they are treated as constants. `mask_N_L` marks real response tokens.
    Aggregation: 'token_mean' divides the token sum by the number of tokens in the batch,
    'sequence_mean' averages each sequence's token mean over the sequences with a token in the mask,
    'constant' divides the token sum by `constant_normalizer` (Dr. GRPO), which must then be positive.
    """
    mask_N_L = mask_N_L.to(logprobs_N_L.dtype)
    log_ratio_N_L = logprobs_N_L - behavior_logprobs_N_L.detach()
    ratio_N_L = torch.exp(log_ratio_N_L)  # pi_theta / mu
    advantages_N_1 = advantages_N.detach().to(logprobs_N_L.dtype)[:, None]
    truncated_N_L = torch.zeros_like(mask_N_L, dtype=torch.bool)
    if objective == "clipped":
        clip_ratio_N_L, weight_N_L = ratio_N_L, 1.0
    elif objective == "decoupled":
        proximal_N_L = logprobs_N_L.detach()
        clip_ratio_N_L = torch.exp(logprobs_N_L - proximal_N_L)  # pi_theta / pi_prox: 1, with its gradient
        weight_N_L = torch.exp(proximal_N_L - behavior_logprobs_N_L.detach())  # pi_prox / mu
        if is_cap > 0:
            truncated_N_L = weight_N_L > is_cap
            weight_N_L = weight_N_L.clamp(max=is_cap)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    unclipped_N_L = clip_ratio_N_L * advantages_N_1
    clipped_N_L = torch.clamp(clip_ratio_N_L, 1.0 - eps_low, 1.0 + eps_high) * advantages_N_1
    per_token_N_L = -weight_N_L * torch.minimum(unclipped_N_L, clipped_N_L)

    kl_ref = torch.zeros(())
    if ref_logprobs_N_L is not None and kl_beta > 0:
        ref_log_ratio_N_L = ref_logprobs_N_L.detach() - logprobs_N_L
        kl_ref_N_L = torch.exp(ref_log_ratio_N_L) - ref_log_ratio_N_L - 1.0  # k3, unbiased and >= 0
        per_token_N_L = per_token_N_L + kl_beta * kl_ref_N_L
        kl_ref = _masked_mean(kl_ref_N_L.detach(), mask_N_L)

    if aggregation == "token_mean":
        loss = (per_token_N_L * mask_N_L).sum() / mask_N_L.sum().clamp(min=1)
    elif aggregation == "sequence_mean":  # over the sequences in the loss: a dropped one has no tokens
        tokens_N = mask_N_L.sum(dim=1)
        per_sequence_N = (per_token_N_L * mask_N_L).sum(dim=1) / tokens_N.clamp(min=1)
        loss = per_sequence_N.sum() / (tokens_N > 0).sum().clamp(min=1)
    elif aggregation == "constant":
        if constant_normalizer <= 0:
            raise ValueError("aggregation 'constant' needs constant_normalizer > 0")
        loss = (per_token_N_L * mask_N_L).sum() / constant_normalizer
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")

    with torch.no_grad():
        # The clip removes the gradient where the clipped term is the smaller (active) one.
        clipped_N_L = ((clip_ratio_N_L < 1.0 - eps_low) & (advantages_N_1 < 0)) | (
            (clip_ratio_N_L > 1.0 + eps_high) & (advantages_N_1 > 0)
        )
        kl_behavior_N_L = (ratio_N_L - 1.0) - log_ratio_N_L  # k3 with r = pi/mu, samples from mu
        real_N_L = mask_N_L > 0
        stats = LossStats(
            clip_frac=float(_masked_mean(clipped_N_L.to(mask_N_L.dtype), mask_N_L)),
            kl_behavior=float(_masked_mean(kl_behavior_N_L, mask_N_L)),
            kl_ref=float(kl_ref),
            ratio_mean=float(_masked_mean(ratio_N_L, mask_N_L)),
            ratio_max=float(ratio_N_L[real_N_L].max()) if real_N_L.any() else 1.0,
            truncated_frac=float(_masked_mean(truncated_N_L.to(mask_N_L.dtype), mask_N_L)),
        )
    return loss, stats
