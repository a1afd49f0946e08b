import math

import pytest
import torch

from stalerl.loss import group_advantages, grpo_loss


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    centered = group_advantages(rewards, scale_by_std=False)
    assert torch.allclose(centered, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    scaled = group_advantages(rewards, scale_by_std=True, eps=0.0 + 1e-12)
    std = math.sqrt((4 * 0.25) / 3)  # sample std of [1, 0, 0, 1]
    assert torch.allclose(scaled[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(scaled[1], torch.zeros(4))  # equal rewards carry no signal


def test_loss_value_and_clip_by_hand():
    # One sequence of 3 tokens with advantage +1, one of 2 tokens (plus padding) with advantage -1.
    behavior = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.5, 0.5, 9.0]])
    logprobs = behavior + torch.log(ratios)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = grpo_loss(logprobs, behavior, advantages, mask, eps_low=0.2, eps_high=0.3)
    # A=+1: min(r, clip(r, .8, 1.3)) = 1.0, 1.3, 0.5 ; A=-1: min(-r, -clip(r)) = -1.5, -0.8
    per_token = [-1.0, -1.3, -0.5, 1.5, 0.8]
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-6)
    # The clip removes the gradient for r=1.5 (A>0, above 1.3) and r=0.5 (A<0, below 0.8): 2 of 5.
    assert stats.clip_frac == pytest.approx(2 / 5)
    seq_loss, _ = grpo_loss(logprobs, behavior, advantages, mask, 0.2, 0.3, aggregation="sequence_mean")
    assert seq_loss.item() == pytest.approx(((-1.0 - 1.3 - 0.5) / 3 + (1.5 + 0.8) / 2) / 2, abs=1e-6)
    const_loss, _ = grpo_loss(logprobs, behavior, advantages, mask, 0.2, 0.3, aggregation="constant",
                              constant_normalizer=10.0)
    assert const_loss.item() == pytest.approx(sum(per_token) / 10, abs=1e-6)


def test_clipped_tokens_get_no_gradient():
    behavior = torch.zeros(1, 2)
    logprobs = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    loss, _ = grpo_loss(logprobs, behavior, torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.2)
    loss.backward()
    assert logprobs.grad[0, 0].item() == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped
    assert logprobs.grad[0, 1].item() == pytest.approx(-1.1 / 2)  # d(-r/2)/dlogp = -r/2


def test_ratio_one_gradient_equals_reinforce_with_group_mean_baseline():
    torch.manual_seed(0)
    G, L, V = 4, 5, 7
    logits = torch.randn(G, L, V, requires_grad=True)
    tokens = torch.randint(0, V, (G, L))
    mask = torch.ones(G, L)
    mask[1, 3:] = 0
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0]])

    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, stats = grpo_loss(logprobs, logprobs.detach(), group_advantages(rewards, scale_by_std=False)[0], mask,
                            aggregation="constant", constant_normalizer=1.0)
    (grpo_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    assert stats.clip_frac == 0.0

    baseline = rewards.mean()
    sequence_logprob = (logprobs * mask).sum(dim=1)
    reinforce_objective = ((rewards[0] - baseline) * sequence_logprob).sum()
    (reinforce_grad,) = torch.autograd.grad(-reinforce_objective, logits)
    assert torch.allclose(grpo_grad, reinforce_grad, atol=1e-6)


def test_kl_terms():
    behavior = torch.log(torch.tensor([[0.5, 0.25]]))
    logprobs = torch.log(torch.tensor([[0.25, 0.25]]))
    reference = torch.log(torch.tensor([[0.5, 0.5]]))
    loss0, stats = grpo_loss(logprobs, behavior, torch.tensor([0.0]), torch.ones(1, 2),
                             ref_logprobs_N_L=reference, kl_beta=0.5)
    # k3 KL(behavior||current) with r = pi/mu: token 1 r = .5 -> .5 - 1 - log .5; token 2 r = 1 -> 0
    assert stats.kl_behavior == pytest.approx((0.5 - 1 - math.log(0.5)) / 2, abs=1e-6)
    # k3 to the reference with u = ref/pi = 2 at both tokens: 2 - log 2 - 1
    assert stats.kl_ref == pytest.approx(2 - math.log(2) - 1, abs=1e-6)
    assert loss0.item() == pytest.approx(0.5 * (2 - math.log(2) - 1), abs=1e-6)


def test_decoupled_objective_by_hand():
    """Decoupled PPO with the proximal policy = theta_t: the clip on pi/pi_prox is inactive (r = 1), and
    each token is weighted by pi_prox / mu, capped at is_cap; stale tokens keep their gradient."""
    behavior = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    ratios = torch.tensor([[1.0, 1.5, 3.0]])  # pi_theta / mu: the last two beyond the clip at 1.2
    logprobs = (behavior + torch.log(ratios)).requires_grad_(True)
    mask = torch.ones(1, 3)
    clipped_loss, clipped_stats = grpo_loss(logprobs, behavior, torch.tensor([1.0]), mask)
    (clipped_grad,) = torch.autograd.grad(clipped_loss, logprobs)
    assert clipped_grad[0, 1:].abs().max().item() == 0.0 and clipped_stats.clip_frac == pytest.approx(2 / 3)

    loss, stats = grpo_loss(logprobs, behavior, torch.tensor([1.0]), mask, objective="decoupled")
    assert loss.item() == pytest.approx(-(1.0 + 1.5 + 3.0) / 3)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.allclose(grad, -ratios / 3)  # d(-w r A / 3)/dlogp at r = 1: -w / 3
    assert stats.clip_frac == 0.0 and stats.truncated_frac == 0.0
    assert stats.ratio_max == pytest.approx(3.0)  # pi_theta / mu, as with the clipped objective

    capped, capped_stats = grpo_loss(logprobs, behavior, torch.tensor([-1.0]), mask, objective="decoupled",
                                     is_cap=2.0)
    assert capped.item() == pytest.approx((1.0 + 1.5 + 2.0) / 3)
    assert capped_stats.truncated_frac == pytest.approx(1 / 3)
    (capped_grad,) = torch.autograd.grad(capped, logprobs)
    assert torch.allclose(capped_grad, torch.tensor([[1.0, 1.5, 2.0]]) / 3)


def test_decoupled_objective_equals_clipped_on_policy():
    torch.manual_seed(0)
    logprobs = torch.randn(4, 5).requires_grad_(True)
    advantages, mask = torch.randn(4), (torch.rand(4, 5) > 0.2).float()
    grads = []
    for objective in ("clipped", "decoupled"):
        loss, _ = grpo_loss(logprobs, logprobs.detach(), advantages, mask, objective=objective)
        grads.append(torch.autograd.grad(loss, logprobs)[0])
    assert torch.allclose(*grads)
