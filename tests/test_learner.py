"""The learner's gradient on hand-made batches: no signal where a group has none, dropped samples out
of every aggregation, and Dr. GRPO's constant independent of the batch's longest response."""

import copy
import dataclasses

import pytest
import torch

from stalerl.config import LossConfig, ModelConfig, RolloutConfig
from stalerl.learner import surrogate_gradient, valid_group_advantages
from stalerl.loss import group_advantages, grpo_loss
from stalerl.model import build_char_tokenizer, build_tiny_llama
from stalerl.rollout import Generation, RolloutBatch, TransformersEngine, policy_logprobs
from stalerl.tasks import AdditionTask

ROLLOUT = RolloutConfig(max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def policy():
    tokenizer = build_char_tokenizer(AdditionTask.alphabet())
    return build_tiny_llama(ModelConfig(), len(tokenizer), seed=0).eval(), tokenizer


def sampled_batch(policy, rewards: list[float], group_size: int = 4) -> RolloutBatch:
    model, tokenizer = policy
    engine = TransformersEngine(model, tokenizer, ROLLOUT.max_new_tokens, ROLLOUT.temperature)
    texts = [text for text in ("1+2=", "3+4=") for _ in range(group_size)]
    return RolloutBatch(batch_index=0, version=0, prompts=[], group_size=group_size,
                        generation=engine.generate(texts, noise_seed=123),
                        rewards_N=torch.tensor(rewards, dtype=torch.float32), sample_ids=list(range(len(texts))))


def gradient(model: torch.nn.Module, batch: RolloutBatch, loss: LossConfig) -> torch.Tensor:
    surrogate_gradient(model, batch, loss, 0, ROLLOUT)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


def rows(generation: Generation, keep: torch.Tensor) -> Generation:
    return dataclasses.replace(
        generation, tokens_N_T=generation.tokens_N_T[keep], attention_mask_N_T=generation.attention_mask_N_T[keep],
        response_mask_N_L=generation.response_mask_N_L[keep],
        behavior_logprobs_N_L=generation.behavior_logprobs_N_L[keep], finished_N=generation.finished_N[keep],
        completions=[generation.completions[i] for i in keep.tolist()])


@pytest.mark.parametrize("reward", [0.7, 1 / 3, 0.1])
def test_a_group_of_equal_partial_credit_rewards_has_no_signal(policy, reward):
    # The float mean of 8 x 0.7 is not exactly 0.7; divided by std + 1e-6 the rounding became |A| ~ 0.06.
    rewards_P_G = torch.full((2, 8), reward)
    assert torch.equal(group_advantages(rewards_P_G), torch.zeros(2, 8))
    assert torch.equal(group_advantages(rewards_P_G, scale_by_std=False), torch.zeros(2, 8))
    valid_P_G = torch.ones(2, 8, dtype=torch.bool)
    valid_P_G[0, :2] = False
    rewards_P_G[0, :2] = 0.0  # the dropped samples' rewards do not make a group differ
    assert torch.equal(valid_group_advantages(rewards_P_G, valid_P_G, scale_by_std=True), torch.zeros(2, 8))

    model = policy[0]
    surrogate = surrogate_gradient(model, sampled_batch(policy, [reward] * 8), LossConfig(), 0, ROLLOUT)
    assert surrogate.zero_adv_frac == 1.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_a_dropped_sample_leaves_the_loss(policy, aggregation):
    """With task.on_reward_error=drop the step is the loss over the valid samples alone."""
    model = policy[0]
    batch = sampled_batch(policy, [0, 1, 0, 1, 1, 0, 0, 1])
    valid_N = torch.tensor([False, False, True, True, True, True, True, True])
    loss = LossConfig(aggregation=aggregation)
    with_drops = gradient(model, dataclasses.replace(batch, valid_N=valid_N), loss)

    keep = valid_N.nonzero().squeeze(1)
    valid_only = rows(batch.generation, keep)
    advantages_N = valid_group_advantages(batch.rewards_N.view(2, 4), valid_N.view(2, 4), True).reshape(-1)
    model.zero_grad()
    logprobs_N_L, _ = policy_logprobs(model, valid_only, ROLLOUT.temperature)
    reference, _ = grpo_loss(logprobs_N_L, valid_only.behavior_logprobs_N_L, advantages_N[keep],
                             valid_only.response_mask_N_L, aggregation=aggregation)
    reference.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(with_drops, expected, atol=1e-6, rtol=1e-4)


def test_the_constant_normalizer_does_not_depend_on_the_longest_response(policy):
    """Dr. GRPO divides by max_new_tokens x N, not by this batch's width: a token's weight must not
    change with the other samples' lengths."""
    model = policy[0]
    batch = sampled_batch(policy, [1, 0, 0, 1, 0, 1, 1, 0])
    generation, pad = batch.generation, 5
    count = generation.tokens_N_T.shape[0]
    wider = dataclasses.replace(  # the same samples, as if another one had run 5 tokens longer
        generation,
        tokens_N_T=torch.cat([generation.tokens_N_T, torch.zeros(count, pad, dtype=torch.long)], dim=1),
        attention_mask_N_T=torch.cat([generation.attention_mask_N_T, torch.zeros(count, pad, dtype=torch.long)], 1),
        response_mask_N_L=torch.cat([generation.response_mask_N_L, torch.zeros(count, pad, dtype=torch.bool)], 1),
        behavior_logprobs_N_L=torch.cat([generation.behavior_logprobs_N_L, torch.zeros(count, pad)], dim=1))
    constant = LossConfig(aggregation="constant")
    narrow_gradient = gradient(model, batch, constant)
    assert torch.allclose(narrow_gradient, gradient(model, dataclasses.replace(batch, generation=wider), constant),
                          atol=1e-7, rtol=1e-5)
    explicit = LossConfig(aggregation="constant", constant_normalizer=float(count * ROLLOUT.max_new_tokens))
    assert torch.equal(narrow_gradient, gradient(model, batch, explicit))


def test_the_learners_adamw_steps_the_same_bits_as_torchs_per_parameter_adamw():
    """make_optimizer asks for torch's multi-tensor AdamW (foreach), faster on CPU, where torch's
    default steps one parameter at a time: the documented runs reproduce only if the bits agree."""
    from stalerl.config import OptimConfig
    from stalerl.learner import make_optimizer

    torch.manual_seed(0)
    ours = build_tiny_llama(ModelConfig(), vocab_size=16, seed=0)
    theirs = copy.deepcopy(ours)
    optim = OptimConfig(lr=1e-3, weight_decay=0.01)
    stepped = make_optimizer(ours, optim)
    reference = torch.optim.AdamW(theirs.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                  weight_decay=optim.weight_decay, foreach=False)
    assert stepped.defaults["foreach"] and not reference.defaults["foreach"]
    for _ in range(5):
        gradients = [torch.randn_like(p) for p in ours.parameters()]
        for model, optimizer in ((ours, stepped), (theirs, reference)):
            for parameter, gradient in zip(model.parameters(), gradients):
                parameter.grad = gradient.clone()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
