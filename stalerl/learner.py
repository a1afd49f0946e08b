"""One learner update: advantages -> recomputed log-probs -> GRPO loss -> optimizer step."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from stalerl.config import LossConfig, OptimConfig
from stalerl.loss import group_advantages, grpo_loss
from stalerl.rollout import RolloutBatch, policy_logprobs


def make_optimizer(model: PreTrainedModel, optim: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay
    )


def learner_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    loss_config: LossConfig,
    optim: OptimConfig,
    temperature: float,
    reference: PreTrainedModel | None = None,
) -> dict[str, float | None]:
    """Applies g_sur(theta_t; D_mu) for a batch sampled by mu = pi(theta_version); returns statistics."""
    generation = batch.generation
    rewards_P_G = batch.rewards_N.view(-1, batch.group_size)
    advantages_N = group_advantages(rewards_P_G, loss_config.scale_by_std).reshape(-1)
    mask_N_L = generation.response_mask_N_L

    logprobs_N_L, entropy_N_L = policy_logprobs(model, generation, temperature)
    ref_logprobs_N_L = None
    if reference is not None:
        with torch.no_grad():
            ref_logprobs_N_L, _ = policy_logprobs(reference, generation, temperature)
    normalizer = loss_config.constant_normalizer or float(mask_N_L.shape[0] * mask_N_L.shape[1])
    loss, stats = grpo_loss(
        logprobs_N_L,
        generation.behavior_logprobs_N_L,
        advantages_N,
        mask_N_L,
        eps_low=loss_config.eps_low,
        eps_high=loss_config.eps_high,
        aggregation=loss_config.aggregation,
        constant_normalizer=normalizer,
        ref_logprobs_N_L=ref_logprobs_N_L,
        kl_beta=loss_config.kl_beta,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = optim.grad_clip if optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()

    mask_f_N_L = mask_N_L.float()
    tokens = mask_f_N_L.sum().clamp(min=1)
    with torch.no_grad():
        mismatch = (logprobs_N_L.detach() - generation.behavior_logprobs_N_L).abs()
    return {
        "loss": float(loss.detach()),
        "clip_frac": stats.clip_frac,
        "kl": stats.kl_behavior,
        "kl_ref": stats.kl_ref if reference is not None else None,
        "ratio_max": stats.ratio_max,
        "entropy": float((entropy_N_L * mask_f_N_L).sum() / tokens),
        "grad_norm": float(grad_norm),
        "response_len": float(mask_f_N_L.sum(dim=1).mean()),
        # |log pi_theta - log mu| per token; sampler/learner numerics when the lag is 0.
        "logprob_diff": float((mismatch * mask_f_N_L).sum() / tokens),
        "zero_adv_frac": float((advantages_N == 0).float().mean()),
    }
