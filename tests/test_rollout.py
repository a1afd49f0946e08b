import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from stalerl.config import ConfigError, TrainConfig, override
from stalerl.model import EOS_ID
from stalerl.rollout import GumbelNoise, RolloutWorker, TransformersEngine, policy_logprobs, response_stop_ids
from stalerl.tasks import AdditionTask, Prompt
from stalerl.warmstart import warm_start_held_out, warm_start_key, warm_started_policy


@pytest.fixture(scope="module")
def policy():
    model, tokenizer, record = warm_started_policy(TrainConfig())
    return model, tokenizer, record


def test_gumbel_argmax_samples_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits / 0.7, -1)[0]
    noise = GumbelNoise(torch.Generator().manual_seed(0), temperature=0.7)
    draws = 40_000
    counts = torch.bincount(noise(None, logits.expand(draws, -1)).argmax(-1), minlength=4).float()
    chi_square = float((((counts - draws * probs) ** 2) / (draws * probs)).sum())
    assert chi_square < 16.3  # 99.9% quantile of chi-square with 3 degrees of freedom


def test_warm_start_is_cached_and_a_real_checkpoint(policy, warm_start_cache):
    model, tokenizer, record = policy
    assert 0.0 < record["val_greedy_accuracy"] < 0.5  # low but non-zero: RL has signal and room
    assert 500_000 < record["parameters"] < 1_500_000
    path = f"{warm_start_cache}/warmstart-{warm_start_key(TrainConfig())}"
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    assert tokenizer.decode(tokenizer("37+5=").input_ids, skip_special_tokens=True) == "37+5="


def test_runs_that_differ_only_in_val_size_share_a_warm_start_that_never_saw_their_val_prompts():
    default = TrainConfig()
    for val_size in (1, 32, 64, 256):
        config = override(default, {"task.val_size": val_size})
        assert warm_start_key(config) == warm_start_key(default)  # one entry, built once
        held_out = AdditionTask(49, warm_start_held_out(config))  # the warm start trains on held_out.train
        assert set(AdditionTask(49, val_size).val) <= set(held_out.val)
    larger = override(default, {"task.val_size": 300})
    assert warm_start_key(larger) != warm_start_key(default) and warm_start_held_out(larger) == 300
    small_task = override(default, {"task.max_operand": 9, "task.val_size": 8})  # 100 pairs
    assert warm_start_held_out(small_task) == 25  # a quarter: 75 left to train on


def test_generation_masks_and_behavior_logprobs(policy):
    model, tokenizer, _ = policy
    engine = TransformersEngine(copy.deepcopy(model), tokenizer, max_new_tokens=6)
    prompts = ["3+4=", "37+45=", "9+10="] * 4
    generation = engine.generate(prompts, noise_seed=7)
    response = generation.tokens_N_T[:, generation.prompt_width:]
    for row, mask, finished, text in zip(response, generation.response_mask_N_L, generation.finished_N,
                                         generation.completions):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # a prefix
        assert finished == (row[length - 1] == EOS_ID)
        assert tokenizer.decode(row[: length - int(finished)]) == text
    # The learner recomputes the sampler's log-probs (same weights): equal up to float noise.
    learner_logprobs, entropy = policy_logprobs(model, generation)
    mask = generation.response_mask_N_L
    assert torch.allclose(learner_logprobs[mask], generation.behavior_logprobs_N_L[mask], atol=1e-4)
    assert (entropy[mask] >= 0).all()
    # Sampled in inference mode, handed out as ordinary tensors: the learner's backward saves the
    # token ids (embedding) and the loss may save the behavior log-probs; in-place changes work too.
    tensors = [value for value in vars(generation).values() if isinstance(value, torch.Tensor)]
    assert len(tensors) == 5 and not any(tensor.is_inference() for tensor in tensors)
    ((learner_logprobs - generation.behavior_logprobs_N_L).exp() * mask).sum().backward()
    assert not engine.score(generation).is_inference()
    generation.behavior_logprobs_N_L.mul_(1.0)
    # Same seed, same samples; another seed, other samples.
    again = engine.generate(prompts, noise_seed=7)
    assert torch.equal(again.tokens_N_T, generation.tokens_N_T)
    assert not torch.equal(engine.generate(prompts, noise_seed=8).tokens_N_T, generation.tokens_N_T)


def test_responses_end_at_any_stop_id_the_checkpoint_or_the_config_names(policy):
    model, tokenizer, _ = policy
    prompts = ["37+45=", "3+4=", "9+10=", "20+21=", "48+49="]
    plain = TransformersEngine(copy.deepcopy(model), tokenizer, 6).generate(prompts, noise_seed=None)
    plain_N_L = plain.tokens_N_T[:, plain.prompt_width:]
    stop = int(plain_N_L[0, 0])  # the first answer digit: ends some responses early, not all
    assert stop != EOS_ID
    token = tokenizer.convert_ids_to_tokens(stop)
    by_config = TransformersEngine(copy.deepcopy(model), tokenizer, 6, stop_tokens=(token,))
    checkpoint_model = copy.deepcopy(model)  # as a generation_config.json listing two end ids would load
    checkpoint_model.generation_config.eos_token_id = [EOS_ID, stop]
    by_checkpoint = TransformersEngine(checkpoint_model, tokenizer, 6)
    assert by_config.stop_ids == by_checkpoint.stop_ids == [EOS_ID, stop]
    ends = [next((i + 1 for i, t in enumerate(row.tolist()) if t in (EOS_ID, stop)), None) for row in plain_N_L]
    assert ends[0] == 1 and any(end is not None and end > 1 for end in ends)
    for engine in (by_config, by_checkpoint):
        generation = engine.generate(prompts, noise_seed=None)
        lengths = generation.response_mask_N_L.sum(dim=1).tolist()
        assert lengths == [end or 6 for end in ends]
        assert generation.finished_N.tolist() == [end is not None for end in ends]
        response_N_L = generation.tokens_N_T[:, generation.prompt_width:]
        for row, plain_row, length in zip(response_N_L, plain_N_L, lengths):
            assert torch.equal(row[:length], plain_row[:length])  # the same greedy tokens, cut at the stop
        assert generation.completions[0] == tokenizer.decode([stop], skip_special_tokens=True)
    with pytest.raises(ConfigError, match=r"rollout.stop_tokens: '<\|im_end\|>' is not one token"):
        response_stop_ids(tokenizer, model.generation_config, ("<|im_end|>",))


def test_worker_batches_depend_only_on_seed_index_and_weights(policy):
    model, tokenizer, _ = policy
    task = AdditionTask(49, 256)
    make = lambda: RolloutWorker(TransformersEngine(copy.deepcopy(model), tokenizer, 6), task, 4, 3, seed=5)  # noqa: E731
    first, second = make(), make()
    second.produce(0)  # a different history must not change batch 1
    a, b = first.produce(1), second.produce(1)
    assert torch.equal(a.generation.tokens_N_T, b.generation.tokens_N_T)
    assert torch.equal(a.rewards_N, b.rewards_N)
    assert a.sample_ids == list(range(12, 24)) and a.version == 0
    assert [p.text for p in a.prompts] == [p.text for p in b.prompts]


def test_addition_task_reward_and_split():
    task = AdditionTask(49, 256)
    assert not {p.text for p in task.validation_prompts()} & {p.text for p in task.train}
    prompt = Prompt("37+5=", "42")
    assert task.reward(prompt, "42", finished=True) == 1.0
    assert task.reward(prompt, "42", finished=False) == 0.0  # no end-of-sequence
    assert task.reward(prompt, "421", finished=True) == 0.0
    rng = np.random.default_rng(0)
    assert all(p in task.train for p in task.sample_prompts(rng, 10))
