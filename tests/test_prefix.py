"""A group's prompt computed once (prefix.py) gives what the whole-sequence forward gives."""

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hf_checkpoint import save_tiny_checkpoint
from stalerl.config import ModelConfig, TrainConfig
from stalerl.policy import add_lora, enable_activation_checkpointing
from stalerl.prefix import can_share, copy_rows, length_buckets, prompt_groups
from stalerl.rollout import STATIC_CACHE_STEP, TransformersEngine, policy_logprobs
from stalerl.warmstart import warm_started_policy


@pytest.fixture(scope="module")
def policy():
    model, tokenizer, _ = warm_started_policy(TrainConfig())
    return model, tokenizer


@pytest.fixture(scope="module")
def bpe_policy(tmp_path_factory):
    """A checkpoint with a BPE tokenizer: prompts of different lengths, so left padding differs by group."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-hf-prefix"), hidden_size=48)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


GROUPS = ["3+4=", "37+45=", "9+10=", "0+0="]
BPE_GROUPS = ["Tom has 3 apples.", "A train leaves at noon and travels 40 miles", "Add 7 and 8.", "Sum?"]


def flat_gradient(model, generation, share, skip_padding=False):
    model.zero_grad(set_to_none=True)
    logprobs_N_L, _ = policy_logprobs(model, generation, 1.0, share_prompts=share, skip_padding=skip_padding)
    (logprobs_N_L * generation.response_mask_N_L).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("which", ["policy", "bpe_policy"])
def test_shared_prompt_logprobs_and_gradient_equal_the_whole_forward(which, request):
    model, tokenizer = request.getfixturevalue(which)
    prompts = [text for text in (GROUPS if which == "policy" else BPE_GROUPS) for _ in range(4)]
    generation = TransformersEngine(copy.deepcopy(model), tokenizer, 6).generate(prompts, noise_seed=3)
    width = generation.prompt_width
    assert len(prompt_groups(generation.tokens_N_T[:, :width], generation.attention_mask_N_T[:, :width]).first_N_of_U) == 4
    mask = generation.response_mask_N_L
    shared, shared_entropy = policy_logprobs(model, generation, 0.8, share_prompts=True)
    whole, whole_entropy = policy_logprobs(model, generation, 0.8, share_prompts=False)
    assert torch.allclose(shared[mask], whole[mask], atol=1e-5)
    assert torch.allclose(shared_entropy[mask], whole_entropy[mask], atol=1e-5)
    shared_grad, whole_grad = flat_gradient(model, generation, True), flat_gradient(model, generation, False)
    assert whole_grad.norm() > 0
    assert float((shared_grad - whole_grad).norm() / whole_grad.norm()) < 1e-4


def assert_same_samples(first, second, prompts, seeds=(1, 2, None)):
    """Both engines give the same samples for the same noise (by default sampled twice, then greedy)."""
    for seed in seeds:
        a, b = first.generate(prompts, noise_seed=seed), second.generate(prompts, noise_seed=seed)
        assert torch.equal(a.tokens_N_T, b.tokens_N_T)
        assert torch.equal(a.attention_mask_N_T, b.attention_mask_N_T)
        assert a.completions == b.completions
        assert torch.allclose(a.behavior_logprobs_N_L, b.behavior_logprobs_N_L, atol=1e-5)


@pytest.mark.parametrize("which", ["policy", "bpe_policy"])
def test_prefilled_generation_samples_what_plain_generation_samples(which, request):
    model, tokenizer = request.getfixturevalue(which)
    prompts = [text for text in (GROUPS if which == "policy" else BPE_GROUPS) for _ in range(8)]
    shared = TransformersEngine(copy.deepcopy(model), tokenizer, 6, 1.0, share_prompts=True)
    plain = TransformersEngine(copy.deepcopy(model), tokenizer, 6, 1.0, share_prompts=False)
    assert_same_samples(shared, plain, prompts)


@pytest.mark.parametrize("lora", [False, True])
def test_a_checkpoints_generation_config_does_not_change_the_samples(bpe_policy, lora):
    """generate() would fill unset settings from the checkpoint's generation_config.json (here tokens
    suppressed, a repetition penalty): mu must stay softmax(logits / T), as the learner computes it."""
    model, tokenizer = bpe_policy
    configured = copy.deepcopy(model)
    settings = GenerationConfig(do_sample=True, temperature=0.3, repetition_penalty=1.5,
                                suppress_tokens=list(range(0, len(tokenizer), 2)))
    configured.generation_config = settings
    if lora:  # fresh adapters leave the outputs as they were; peft's generate has its own config copy
        pytest.importorskip("peft")
        configured = add_lora(configured, ModelConfig(lora_rank=4))
    prompts = [text for text in BPE_GROUPS for _ in range(4)]
    engine = TransformersEngine(configured, tokenizer, 8, 1.0)
    assert_same_samples(engine, TransformersEngine(copy.deepcopy(model), tokenizer, 8, 1.0), prompts)
    # the checkpoint's own settings are given back (to save_pretrained with the final model)
    assert configured.generation_config is settings
    assert getattr(configured, "get_base_model", lambda: configured)().generation_config is settings
    generation = engine.generate(prompts, noise_seed=5)
    learner_logprobs, _ = policy_logprobs(model, generation, 1.0)
    mask = generation.response_mask_N_L
    assert torch.allclose(learner_logprobs[mask], generation.behavior_logprobs_N_L[mask], atol=1e-4)


def test_a_static_cache_samples_what_the_dynamic_cache_samples(bpe_policy):
    """rollout.static_cache (compiled decoding on a GPU) changes the cache, not the samples; on CPU
    transformers does not compile, so this checks the cache and the padding, not CUDA graphs."""
    model, tokenizer = copy.deepcopy(bpe_policy[0]), bpe_policy[1]  # its weights change below
    prompts = [text for text in BPE_GROUPS for _ in range(4)]  # left padding differs by group
    static = TransformersEngine(copy.deepcopy(model), tokenizer, 6, static_cache=True)
    dynamic = TransformersEngine(copy.deepcopy(model), tokenizer, 6, share_prompts=False)
    assert_same_samples(static, dynamic, prompts)
    assert static.generation_config.max_cache_len == STATIC_CACHE_STEP  # prompt + 6 tokens, rounded up
    assert_same_samples(static, dynamic, prompts[-4:], seeds=[3])  # a smaller batch, shorter prompts
    assert static.generation_config.max_cache_len == STATIC_CACHE_STEP
    # new weights reach the static engine: CUDA graphs read the parameters in place, so no stale copy may stay
    before = static.generate(prompts, noise_seed=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    for engine in (static, dynamic):
        engine.load_weights(model.state_dict(), version=1)
    assert_same_samples(static, dynamic, prompts, seeds=[4])
    after = static.generate(prompts, noise_seed=4)
    assert not torch.allclose(after.behavior_logprobs_N_L, before.behavior_logprobs_N_L, atol=1e-3)


def test_groups_found_in_any_row_order_and_single_token_responses(policy):
    model, tokenizer = policy
    prompts = ["3+4=", "37+45=", "3+4=", "9+1=", "37+45=", "3+4="]  # interleaved, uneven groups
    engine = TransformersEngine(copy.deepcopy(model), tokenizer, 1)  # responses of one token
    generation = engine.generate(prompts, noise_seed=5)
    width = generation.prompt_width
    groups = prompt_groups(generation.tokens_N_T[:, :width], generation.attention_mask_N_T[:, :width])
    row_of_N = groups.row_of_N.tolist()
    assert row_of_N[0] == row_of_N[2] == row_of_N[5] and row_of_N[1] == row_of_N[4] and len(set(row_of_N)) == 3
    assert groups.first_N_of_U[row_of_N[0]] == 0 and groups.first_N_of_U[row_of_N[1]] == 1
    assert groups.first_N_of_U[row_of_N[3]] == 3
    assert torch.equal(groups.row_of_N[groups.first_N_of_U], torch.arange(3))
    shared, _ = policy_logprobs(model, generation, 1.0, share_prompts=True)
    whole, _ = policy_logprobs(model, generation, 1.0, share_prompts=False)
    assert shared.shape == (6, 1) and torch.allclose(shared, whole, atol=1e-5)


def test_activation_checkpointing_runs_every_row_whole(bpe_policy):
    model, tokenizer = bpe_policy
    model = copy.deepcopy(model)
    prompts = [text for text in BPE_GROUPS for _ in range(3)]
    generation = TransformersEngine(copy.deepcopy(model), tokenizer, 6).generate(prompts, noise_seed=3)
    expected, _ = policy_logprobs(model, generation, 1.0, share_prompts=False)
    enable_activation_checkpointing(model)
    model.train()  # where the cache is switched off
    assert not can_share(model)
    logprobs, _ = policy_logprobs(model, generation, 1.0, share_prompts=True)
    mask = generation.response_mask_N_L
    assert torch.allclose(logprobs[mask], expected[mask], atol=1e-5)


def test_a_pad_id_used_as_a_real_token_does_not_merge_prompts():
    pad = 0
    tokens = torch.tensor([[pad, 5, 6], [pad, 5, 6], [pad, 5, 6]])  # the same ids ...
    masks = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]])  # ... but row 2's first token is real
    groups = prompt_groups(tokens, masks)
    assert groups.row_of_N[0] == groups.row_of_N[1] != groups.row_of_N[2] and groups.saves_work


def test_copy_rows_sums_gradients_as_index_select_does():
    """Interleaved, uneven groups and a strided incoming gradient (the cache's keys are a slice of
    attention's): the same values and, bit for bit, the same gradient as torch's index_select."""
    source = torch.randn(3, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    row_of_N = torch.tensor([0, 2, 0, 1, 2, 0, 0])
    upstream = torch.randn(7, 4, 9, 8, dtype=torch.float64)[:, :, 2:7]  # not contiguous
    assert not upstream.is_contiguous()
    copied = copy_rows(source, row_of_N)
    assert torch.equal(copied, source.detach().index_select(0, row_of_N))
    (ours,) = torch.autograd.grad(copied, source, upstream)
    (torchs,) = torch.autograd.grad(source.index_select(0, row_of_N), source, upstream)
    assert torch.equal(ours, torchs)
    assert torch.autograd.gradcheck(lambda x: copy_rows(x, row_of_N), (source,))
    with torch.no_grad():  # generation: no graph kept
        assert not copy_rows(source, row_of_N).requires_grad


def response_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def test_short_responses_get_a_narrower_pass_only_where_it_skips_enough_padding():
    # 7 rows of 3 tokens and one of 6: a pass of width 3 for the 7 skips 21 of 48 positions
    buckets = length_buckets(response_mask([3, 3, 1, 3, 6, 3, 2, 3], 6))
    assert [(rows.tolist(), width) for rows, width in buckets] == [([0, 1, 2, 3, 5, 6, 7], 3), ([4], 6)]
    assert length_buckets(response_mask([6, 6, 6, 6], 6)) == [(None, 6)]
    # width 5 for the three would skip 3 of 24 positions (12.5%): not worth a second pass
    assert length_buckets(response_mask([5, 5, 5, 6], 6)) == [(None, 6)]
    # a batch padded past its longest response: one narrower pass of every row
    assert length_buckets(response_mask([2, 1, 2, 2], 6)) == [(None, 2)]


def with_response_lengths(generation, lengths: list[int]):
    """The same sequences cut to the given response lengths (the tokens after a cut stay, as padding)."""
    mask_N_L = response_mask(lengths, generation.response_mask_N_L.shape[1])
    attention_mask_N_T = generation.attention_mask_N_T.clone()
    attention_mask_N_T[:, generation.prompt_width:] = mask_N_L
    return dataclasses.replace(generation, response_mask_N_L=mask_N_L, attention_mask_N_T=attention_mask_N_T,
                               behavior_logprobs_N_L=generation.behavior_logprobs_N_L * mask_N_L)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("which", ["policy", "bpe_policy"])
def test_skipping_the_padding_gives_what_the_whole_width_gives(which, share, request):
    model, tokenizer = request.getfixturevalue(which)
    prompts = [text for text in (GROUPS if which == "policy" else BPE_GROUPS) for _ in range(4)]
    # hot sampling, for a batch as wide as max_new_tokens
    generation = TransformersEngine(copy.deepcopy(model), tokenizer, 6, 4.0).generate(prompts, noise_seed=3)
    assert generation.response_mask_N_L.shape[1] == 6
    # two long responses, in two groups, among short ones: 11 rows of up to 2 tokens get a pass of
    # width 2 (skipping 44 positions of 96; width 3 for 14 rows would skip 42)
    for lengths, buckets in [([2, 3, 2, 2, 6, 2, 3, 1, 2, 2, 2, 3, 2, 5, 2, 2], [(11, 2), (5, 6)]),
                             ([2, 3, 3, 3, 3, 3, 3, 1, 3, 3, 3, 3, 2, 3, 3, 3], [(None, 3)])]:  # none wider than 3
        cut = with_response_lengths(generation, lengths)
        mask = cut.response_mask_N_L
        assert [(None if rows is None else len(rows), width) for rows, width in length_buckets(mask)] == buckets
        skipped, skipped_entropy = policy_logprobs(model, cut, 0.8, share_prompts=share, skip_padding=True)
        whole, whole_entropy = policy_logprobs(model, cut, 0.8, share_prompts=share)
        assert skipped.shape == whole.shape == mask.shape
        assert torch.allclose(skipped[mask], whole[mask], atol=1e-5)
        assert torch.allclose(skipped_entropy[mask], whole_entropy[mask], atol=1e-5)
        narrow = buckets[0][1]
        short_N = mask.sum(dim=1) <= narrow
        assert torch.equal(skipped[short_N, narrow:], torch.zeros(int(short_N.sum()), 6 - narrow))  # not computed
        skipped_grad, whole_grad = flat_gradient(model, cut, share, True), flat_gradient(model, cut, share)
        assert whole_grad.norm() > 0
        assert float((skipped_grad - whole_grad).norm() / whole_grad.norm()) < 1e-5
