"""One learner update: advantages -> recomputed log-probs -> GRPO loss -> optimizer step."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from transformers import PreTrainedModel

from stalerl.config import LossConfig, OptimConfig, RolloutConfig
from stalerl.loss import group_advantages, grpo_loss
from stalerl.optimizer import MasterWeightAdamW
from stalerl.prefix import activation_checkpointing, can_share
from stalerl.rollout import Generation, RolloutBatch, inverse, policy_logprobs


def make_optimizer(model: PreTrainedModel, optim: OptimConfig) -> MasterWeightAdamW:
    """AdamW (frozen parameters get no gradient, so no state); fp32 masters for bf16 ones (optimizer.py).

    foreach: torch's default on a GPU; on CPU its default steps the parameters one at a time, 5.2 ms
    a step on the embedded default against 4.1 ms, with the same bits (tests/test_learner.py).
    """
    return MasterWeightAdamW(model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             weight_decay=optim.weight_decay, foreach=True)


def learner_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    loss_config: LossConfig,
    optim: OptimConfig,
    rollout: RolloutConfig,
    reference: PreTrainedModel | None = None,
    choose_lr: Callable[[dict[str, float]], float] | None = None,
    share_prompts: bool = True,
) -> dict[str, float | None]:
    """Applies g_sur(theta_t; D_mu) for a batch sampled by mu = pi(theta_version); returns statistics.

    `choose_lr`, if given, sees the batch statistics (lag-independent ones such as `ess_frac`) after
    the backward pass and returns this step's learning rate (the stabilizers in stabilizers.py).
    """
    surrogate = surrogate_gradient(model, batch, loss_config, optim.micro_batch_size, rollout, reference,
                                   share_prompts, optim.skip_padding)
    logprobs_N_L, entropy_N_L, mask_N_L = surrogate.logprobs_N_L, surrogate.entropy_N_L, surrogate.mask_N_L
    behavior_logprobs_N_L = batch.generation.behavior_logprobs_N_L.to(mask_N_L.device)
    tokens = float(mask_N_L.sum().clamp(min=1))
    in_loss_N = mask_N_L.any(dim=1)  # False for a sample dropped for its failed reward (task.on_reward_error)

    # Every sample's reward failed and was dropped (task.on_reward_error=drop): nothing to learn from.
    # No step either: with a zero gradient, Adam's momentum and weight decay would still move the weights.
    empty = not bool(in_loss_N.any())

    max_norm = optim.grad_clip if optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    ess_frac = None if empty else effective_sample_fraction(logprobs_N_L[in_loss_N], behavior_logprobs_N_L[in_loss_N],
                                                            mask_N_L[in_loss_N])
    lr = choose_lr({"ess_frac": ess_frac}) if choose_lr is not None and not empty else optim.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    # A non-finite loss or gradient would poison the weights and Adam's moments for good: the update
    # is skipped, weights and optimizer untouched (train.py counts these; guard.max_bad_steps stops).
    skipped = not (math.isfinite(surrogate.loss) and math.isfinite(float(grad_norm)))
    if skipped or empty:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()

    mask_f_N_L = mask_N_L.float()
    with torch.no_grad():
        mismatch = (logprobs_N_L - behavior_logprobs_N_L).abs()
    return {
        "loss": surrogate.loss,
        "clip_frac": surrogate.clip_frac,
        "kl": surrogate.kl,
        "kl_ref": surrogate.kl_ref if reference is not None else None,
        "ratio_max": surrogate.ratio_max,
        "truncated_frac": surrogate.truncated_frac,
        "entropy": float((entropy_N_L * mask_f_N_L).sum() / tokens),
        "grad_norm": float(grad_norm),
        "response_len": float(mask_f_N_L.sum(dim=1)[in_loss_N].mean()) if in_loss_N.any() else 0.0,
        # |log pi_theta - log mu| per token. At lag 0 it is the sampler/learner numeric mismatch
        # (kernels, dtype); at lag s it also holds the policy change over s steps.
        "logprob_mismatch": float((mismatch * mask_f_N_L).sum() / tokens),
        "zero_adv_frac": surrogate.zero_adv_frac,
        "ess_frac": ess_frac,
        "lr": lr,
        "skipped_update": int(skipped),
        "in_loss_frac": float(in_loss_N.float().mean()),  # below 1: samples dropped for a failed reward
    }


@dataclasses.dataclass
class Surrogate:
    """What one backward pass of the GRPO surrogate left behind (the gradient is in the .grad fields)."""

    loss: float
    clip_frac: float
    kl: float
    kl_ref: float
    ratio_max: float
    truncated_frac: float
    zero_adv_frac: float
    logprobs_N_L: torch.Tensor  # [N, L] log pi_theta, detached
    entropy_N_L: torch.Tensor  # [N, L]
    mask_N_L: torch.Tensor  # [N, L] the tokens in the loss (failed rewards dropped)


def surrogate_gradient(
    model: PreTrainedModel,
    batch: RolloutBatch,
    loss_config: LossConfig,
    micro_batch_size: int,
    rollout: RolloutConfig,
    reference: PreTrainedModel | None = None,
    share_prompts: bool = True,
    skip_padding: bool = False,
) -> Surrogate:
    """Fills the parameters' .grad with g_sur(theta; D_mu), the gradient learner_step applies
    (before clipping); the bias probe (lab/bias.py) calls it too, so it measures this gradient.

    `skip_padding` (optim.skip_padding): no pass wider than its rows' longest response, and the short
    rows of a micro-batch in a narrower pass of their own (rollout.policy_logprobs); where rows run
    whole, micro-batches of rows of about the same length."""
    generation = batch.generation
    device = next(model.parameters()).device
    rewards_P_G = batch.rewards_N.view(-1, batch.group_size)
    mask_N_L = generation.response_mask_N_L.to(device)
    if batch.valid_N is None:
        advantages_N = group_advantages(rewards_P_G, loss_config.scale_by_std).reshape(-1)
    else:  # samples whose reward failed (task.on_reward_error=drop) leave the loss and the group statistics
        valid_P_G = batch.valid_N.view_as(rewards_P_G)
        advantages_N = valid_group_advantages(rewards_P_G, valid_P_G, loss_config.scale_by_std).reshape(-1)
        mask_N_L = mask_N_L & batch.valid_N.to(device)[:, None]
    advantages_N = advantages_N.to(device)
    count = mask_N_L.shape[0]
    micro = micro_batch_size or count
    tokens = float(mask_N_L.sum().clamp(min=1))
    sequences = float(mask_N_L.any(dim=1).sum().clamp(min=1))
    # Dr. GRPO's constant: the same for every batch, whatever its samples' lengths
    normalizer = loss_config.constant_normalizer or float(count * rollout.max_new_tokens)

    # Gradient accumulation over micro-batches of rows. Each part's loss is re-weighted so that the
    # parts sum to the whole-batch loss exactly: token_mean by the part's share of the batch's tokens,
    # sequence_mean by its share of the sequences; 'constant' already divides by a batch constant.
    # Activation checkpointing runs only in training mode; otherwise stay in eval mode (no dropout),
    # as the sampler is, so that the learner's log-probs match the sampler's.
    model.train(activation_checkpointing(model))
    for parameter in model.parameters():
        parameter.grad = None
    loss_value, clip_frac, kl, kl_ref, ratio_max, truncated_frac = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    logprob_parts, entropy_parts = [], []
    # Where each row runs whole (no shared prompt), micro-batches of rows of about the same length
    # are about as wide as their rows need. Where a group's prompt is shared, sorting would scatter
    # the groups over the micro-batches and multiply the prompt passes (benchmarks/skip_padding.py).
    order_N = None
    if skip_padding and micro < count and not (share_prompts and can_share(model)):
        order_N = torch.argsort(generation.response_mask_N_L.sum(dim=1).cpu(), stable=True)
    for start in range(0, count, micro):
        rows = slice(start, start + micro) if order_N is None else order_N[start:start + micro]
        part = rows_of(generation, rows, device)
        part_mask_n_L = mask_N_L[rows]
        logprobs_n_L, entropy_n_L = policy_logprobs(model, part, rollout.temperature, share_prompts, skip_padding)
        ref_logprobs_n_L = None
        if reference is not None:
            with torch.no_grad():
                ref_logprobs_n_L, _ = policy_logprobs(reference, part, rollout.temperature, share_prompts,
                                                      skip_padding)
        part_loss, stats = grpo_loss(
            logprobs_n_L,
            part.behavior_logprobs_N_L,
            advantages_N[rows],
            part_mask_n_L,
            eps_low=loss_config.eps_low,
            eps_high=loss_config.eps_high,
            aggregation=loss_config.aggregation,
            constant_normalizer=normalizer,
            ref_logprobs_N_L=ref_logprobs_n_L,
            kl_beta=loss_config.kl_beta,
            objective=loss_config.objective,
            is_cap=loss_config.is_cap,
        )
        token_share = float(part_mask_n_L.sum()) / tokens
        sequence_share = float(part_mask_n_L.any(dim=1).sum()) / sequences
        weight = {"token_mean": token_share, "sequence_mean": sequence_share}.get(loss_config.aggregation, 1.0)
        (part_loss * weight).backward()
        loss_value += float(part_loss.detach()) * weight
        clip_frac += stats.clip_frac * token_share
        truncated_frac += stats.truncated_frac * token_share
        kl += stats.kl_behavior * token_share
        kl_ref += stats.kl_ref * token_share
        ratio_max = max(ratio_max, stats.ratio_max)
        logprob_parts.append(logprobs_n_L.detach())
        entropy_parts.append(entropy_n_L)
    model.eval()
    zero_adv_frac = float((advantages_N == 0).float().mean())
    logprobs_N_L, entropy_N_L = torch.cat(logprob_parts), torch.cat(entropy_parts)
    if order_N is not None:  # back to the batch's row order
        back_N = inverse(order_N)
        logprobs_N_L, entropy_N_L = logprobs_N_L[back_N], entropy_N_L[back_N]
    return Surrogate(loss_value, clip_frac, kl, kl_ref, ratio_max, truncated_frac, zero_adv_frac,
                     logprobs_N_L, entropy_N_L, mask_N_L)


def rows_of(generation: Generation, rows: slice | torch.Tensor, device: torch.device) -> Generation:
    """A micro-batch: the sequences `rows` (a slice, or indices on the CPU) of a generation, on the
    learner's device."""
    completions = (generation.completions[rows] if isinstance(rows, slice)
                   else [generation.completions[row] for row in rows.tolist()])
    return dataclasses.replace(
        generation,
        tokens_N_T=generation.tokens_N_T[rows].to(device),
        attention_mask_N_T=generation.attention_mask_N_T[rows].to(device),
        response_mask_N_L=generation.response_mask_N_L[rows].to(device),
        behavior_logprobs_N_L=generation.behavior_logprobs_N_L[rows].to(device),
        finished_N=generation.finished_N[rows],
        completions=completions,
    )


def valid_group_advantages(rewards_P_G: torch.Tensor, valid_P_G: torch.Tensor, scale_by_std: bool,
                           eps: float = 1e-6) -> torch.Tensor:
    """group_advantages over each group's valid samples only; 0 for invalid ones and for groups
    with fewer than 2 valid samples or whose valid rewards are all equal (no baseline, no signal)."""
    valid_f_P_G = valid_P_G.float()
    count_P_1 = valid_f_P_G.sum(dim=1, keepdim=True)
    mean_P_1 = (rewards_P_G * valid_f_P_G).sum(dim=1, keepdim=True) / count_P_1.clamp(min=1)
    centered_P_G = (rewards_P_G - mean_P_1) * valid_f_P_G
    if scale_by_std:
        std_P_1 = ((centered_P_G**2).sum(dim=1, keepdim=True) / (count_P_1 - 1).clamp(min=1)).sqrt()
        centered_P_G = centered_P_G / (std_P_1 + eps)
    highest_P_1 = rewards_P_G.masked_fill(~valid_P_G, -math.inf).amax(dim=1, keepdim=True)
    lowest_P_1 = rewards_P_G.masked_fill(~valid_P_G, math.inf).amin(dim=1, keepdim=True)
    return centered_P_G * ((count_P_1 >= 2) & (highest_P_1 > lowest_P_1))


def effective_sample_fraction(
    logprobs_N_L: torch.Tensor, behavior_logprobs_N_L: torch.Tensor, mask_N_L: torch.Tensor
) -> float:
    """ESS / N of the sequence-level importance weights w = pi_theta(y) / mu(y), in (0, 1].

    1 when the data is on-policy; it falls as the behavior policy drifts away from the learner.
    """
    log_weights_N = ((logprobs_N_L - behavior_logprobs_N_L) * mask_N_L).sum(dim=1)
    weights_N = torch.exp(log_weights_N - log_weights_N.max())  # the scale cancels in the ratio
    return float(weights_N.sum() ** 2 / (weights_N.pow(2).sum() * weights_N.numel()))
