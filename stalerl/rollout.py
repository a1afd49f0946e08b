"""The rollout engine: sampling groups of responses with their behavior log-probs and policy version.

Generation is transformers' own ``generate`` with its KV cache, prefilled once per distinct prompt
of a group (prefix.py), or with a static cache that transformers compiles on a GPU
(rollout.static_cache). Sampling is done as greedy decoding of Gumbel-perturbed logits
(argmax(logits / T + Gumbel) is an exact sample of softmax(logits / T)):
the noise comes from an explicit ``torch.Generator`` seeded per batch, so a batch is reproducible
from (seed, batch index) whatever else runs in the process, and two policies can be sampled with
the same noise (common random numbers, used by the bias probe).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from stalerl.config import ConfigError
from stalerl.prefix import cache_argument, response_logit_parts, shared_prompt_cache, take_rows
from stalerl.tasks import Prompt, Task

STATIC_CACHE_STEP = 64  # tokens: the static KV cache's length is a multiple of this


@dataclass
class Generation:
    """N sequences: a left-padded prompt block of width T_p followed by L response positions."""

    # "End-of-sequence" below is any of the engine's stop ids (response_stop_ids).
    tokens_N_T: torch.Tensor  # [N, T_p + L] prompt ids then response ids (pad after end-of-sequence)
    attention_mask_N_T: torch.Tensor  # [N, T_p + L] 1 on real prompt and response tokens
    response_mask_N_L: torch.Tensor  # [N, L] 1 on response tokens, end-of-sequence included
    behavior_logprobs_N_L: torch.Tensor  # [N, L] log mu(y_t | x, y_<t) at sampling time, 0 on padding
    finished_N: torch.Tensor  # [N] True where the response ended with end-of-sequence
    completions: list[str]  # decoded responses, special tokens (end-of-sequence) and padding removed

    @property
    def prompt_width(self) -> int:
        return self.tokens_N_T.shape[1] - self.response_mask_N_L.shape[1]

    def with_tensors_copied(self) -> Generation:
        """A copy whose tensors autograd can use. Tensors made in inference mode cannot be saved for
        a backward pass (the learner's embedding saves its token ids) nor changed in place; a copy
        made outside it can."""
        copied = {name: value.clone() for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        return replace(self, **copied)


@dataclass
class RolloutBatch:
    """One learner step's data: P prompts x G samples from one policy version."""

    batch_index: int  # the learner step this batch was made for (exact mode) / its production order
    version: int  # k of theta_k, the policy that sampled every sample of the batch
    prompts: list[Prompt]  # [P]
    group_size: int
    generation: Generation  # N = P * G sequences, sample j belongs to prompt j // G
    rewards_N: torch.Tensor  # [N]
    sample_ids: list[int]  # [N] unique over the run
    gen_s: float = 0.0
    extras: dict = field(default_factory=dict)
    # [N] False where the reward failed and task.on_reward_error=drop: out of the loss and its
    # group's statistics (rewards_N holds 0 there). None: every sample counts.
    valid_N: torch.Tensor | None = None

    def mean_reward(self) -> float:
        """The batch's training reward: the mean over the samples that were scored (a dropped sample's
        0 is no score, and would read as a falling reward to collapse detection); 0 if none was."""
        rewards_N = self.rewards_N if self.valid_N is None else self.rewards_N[self.valid_N]
        return float(rewards_N.mean()) if rewards_N.numel() else 0.0

    def sample_rewards(self) -> list[float | None]:
        """Each sample's reward for samples.jsonl; None for a sample dropped for its failed reward."""
        rewards = self.rewards_N.tolist()
        if self.valid_N is None:
            return rewards
        return [reward if valid else None for reward, valid in zip(rewards, self.valid_N.tolist())]


def response_stop_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None,
                      stop_tokens: Sequence[str] = ()) -> list[int]:
    """The token ids that end a response, for every engine alike: the tokenizer's end-of-sequence, the
    checkpoint's own (generation_config.json's eos_token_id, as generate() and vLLM stop on: Llama-3.x
    Instruct lists <|eot_id|> beside <|end_of_text|>), and rollout.stop_tokens, for a chat turn's end
    that neither calls end-of-sequence (a base model under a chat template: Qwen's <|im_end|>)."""
    ids = [tokenizer.eos_token_id]
    checkpoint_ids = generation_config.eos_token_id if generation_config is not None else None
    ids += [checkpoint_ids] if isinstance(checkpoint_ids, int) else list(checkpoint_ids or [])
    vocabulary = tokenizer.get_vocab()
    for token in stop_tokens:
        if token not in vocabulary:
            pieces = tokenizer.tokenize(token)
            raise ConfigError(f"rollout.stop_tokens: {token!r} is not one token of the tokenizer (it splits into "
                              f"{pieces!r}); give a token of its vocabulary, e.g. one of its special tokens "
                              f"{tokenizer.all_special_tokens[:6]!r}")
        ids.append(vocabulary[token])
    return list(dict.fromkeys(ids))  # once each, the tokenizer's first


class RolloutEngine(Protocol):
    """What the learner and the staleness pipeline need from a generator (transformers, vLLM)."""

    version: int
    sync_s: float  # seconds spent in load_weights since the rollout worker last read it

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    def generate(self, prompts: list[str], noise_seed: int | None) -> Generation: ...

    def score(self, generation: Generation) -> torch.Tensor: ...  # [N, L] log mu by the learner's forward

    def close(self) -> None: ...  # frees what the engine holds outside Python's reach (vLLM's GPU memory)


class GumbelNoise(LogitsProcessor):
    """Adds Gumbel noise from a private generator to logits / temperature (see module doc)."""

    def __init__(self, generator: torch.Generator, temperature: float):
        self.generator = generator
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.perturb(scores / self.temperature)

    def perturb(self, scaled: torch.Tensor) -> torch.Tensor:
        """logits / T (already divided) plus Gumbel noise."""
        uniform = torch.rand(scaled.shape, generator=self.generator, device=self.generator.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1.0 - 1e-7)))
        return scaled + gumbel.to(scaled.device, scaled.dtype)


class SampledTokens(LogitsProcessor):
    """The last logits processor: Gumbel noise on the logits (none: greedy), and a record, step by
    step, of the token greedy decoding then takes and its behavior log-prob log softmax(logits / T).

    One float a row and step, where keeping every step's logits (output_logits) would hold
    N x L x V floats: 134 GB for 512 rows of 512 tokens over Llama-3's 128,256-token vocabulary.
    """

    def __init__(self, temperature: float, noise: GumbelNoise | None):
        self.temperature = temperature
        self.noise = noise
        self.tokens: list[torch.Tensor] = []  # [N] a step
        self.logprobs: list[torch.Tensor] = []  # [N] a step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores are the raw logits: the behavior distribution is softmax(logits / T) with or without noise
        scaled = scores.float() / self.temperature
        chosen = scores if self.noise is None else self.noise.perturb(scaled)
        token_N = chosen.argmax(dim=-1)  # what greedy decoding takes from what this returns
        logprobs_N_V = torch.log_softmax(scaled, dim=-1)
        self.tokens.append(token_N)
        self.logprobs.append(logprobs_N_V.gather(-1, token_N[:, None]).squeeze(-1))
        return chosen


@contextlib.contextmanager
def checkpoint_settings_hidden(model: PreTrainedModel) -> Iterator[None]:
    """generate() fills what our GenerationConfig leaves unset from the checkpoint's own
    generation_config.json: a repetition penalty or suppressed tokens there would make mu something
    other than softmax(logits / T). Inside, the model has none; after, it gets its own back. peft's
    generate copies its wrapper's settings into the base model, so both are swapped."""
    models = [model]
    if hasattr(model, "get_base_model") and model.get_base_model() is not model:
        models.append(model.get_base_model())
    saved = [each.generation_config for each in models]
    for each in models:
        each.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for each, settings in zip(models, saved):
            each.generation_config = settings


class TransformersEngine:
    """Generates with a private copy of the policy; the learner's weights reach it via load_weights."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        temperature: float = 1.0,
        share_prompts: bool = True,
        static_cache: bool = False,
        stop_tokens: Sequence[str] = (),
    ):
        self.model = model.eval()
        self.share_prompts = share_prompts  # a group's prompt prefilled once (prefix.py)
        self.static_cache = static_cache  # see RolloutConfig.static_cache
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.version = 0
        self.sync_s = 0.0  # weight-sync time since the last batch (the worker reads and resets it)
        self.device = next(model.parameters()).device
        self.stop_ids = response_stop_ids(tokenizer, model.generation_config, stop_tokens)
        self.generation_config = GenerationConfig(
            do_sample=False,  # sampling happens in SampledTokens; greedy when no noise is given
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
            bos_token_id=tokenizer.bos_token_id,
            use_cache=True,
            cache_implementation="static" if static_cache else None,
        )

    def close(self) -> None:
        """Nothing to free: the policy copy goes with the engine."""

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        start = time.perf_counter()
        self.model.load_state_dict(state_dict)
        if self.device.type == "cuda":  # the copies run asynchronously: wait, so that sync_s is their time
            # (this thread's stream only: a rollout thread on a stream of its own does not wait for the learner)
            torch.cuda.current_stream(self.device).synchronize()
        self.sync_s += time.perf_counter() - start
        self.version = version

    def score(self, generation: Generation) -> torch.Tensor:
        """log mu by the learner's forward pass on this engine's (behavior) weights, 0 on padding."""
        with torch.inference_mode():
            logprobs_N_L, _ = policy_logprobs(self.model, generation, self.temperature, self.share_prompts)
            scored_N_L = logprobs_N_L * generation.response_mask_N_L
        return scored_N_L.clone()  # out of inference mode, for the learner (Generation.with_tensors_copied)

    def generate(self, prompts: list[str], noise_seed: int | None) -> Generation:
        """Samples one response per prompt string (repeat a prompt G times for a group).

        With ``noise_seed=None`` decoding is greedy (used for validation).
        """
        # Inference mode, not just no_grad: no autograd bookkeeping on any tensor. Sampling the
        # embedded default's batch takes 5% less time (36.0 against 38.0 ms, medians of 35 calls).
        with torch.inference_mode():
            generation = self._sample(prompts, noise_seed)
        return generation.with_tensors_copied()

    def _sample(self, prompts: list[str], noise_seed: int | None) -> Generation:
        # A group repeats its prompt G times: tokenize each distinct prompt once, then index (the same tensors).
        distinct = list(dict.fromkeys(prompts))
        position = {text: i for i, text in enumerate(distinct)}
        rows_N = torch.tensor([position[text] for text in prompts])
        encoded_U = {key: value.to(self.device)
                     for key, value in self.tokenizer(distinct, return_tensors="pt", padding=True).items()}
        encoded = {key: value[rows_N] for key, value in encoded_U.items()}
        prompt_width = encoded["input_ids"].shape[1]
        prefilled = {}
        if self.static_cache:
            # In whole steps (and transformers keeps the largest length asked for): a batch whose
            # prompt is a few tokens longer reuses the compiled graph instead of compiling another.
            needed = prompt_width + self.generation_config.max_new_tokens
            self.generation_config.max_cache_len = -(-needed // STATIC_CACHE_STEP) * STATIC_CACHE_STEP
        elif self.share_prompts and len(distinct) < len(prompts) and encoded_U["input_ids"].shape[1] > 1:
            # All but the last prompt column, once per distinct prompt; generate() runs the rest.
            cache, _ = shared_prompt_cache(self.model, encoded_U["input_ids"][:, :-1],
                                           encoded_U["attention_mask"][:, :-1], rows_N.to(self.device))
            prefilled[cache_argument(self.model)] = cache
        noise = None
        if noise_seed is not None:
            noise = GumbelNoise(torch.Generator(device=self.device).manual_seed(noise_seed), self.temperature)
        sampled = SampledTokens(self.temperature, noise)
        with checkpoint_settings_hidden(self.model):
            tokens_N_T = self.model.generate(**encoded, **prefilled, generation_config=self.generation_config,
                                             logits_processor=LogitsProcessorList([sampled]))
        response_N_L = tokens_N_T[:, prompt_width:]

        is_eos_N_L = torch.isin(response_N_L, torch.tensor(self.stop_ids, device=response_N_L.device))
        # A position is part of the response if no end-of-sequence came strictly before it.
        eos_before_N_L = (is_eos_N_L.long().cumsum(dim=1) - is_eos_N_L.long()) > 0
        response_mask_N_L = ~eos_before_N_L
        logprobs_N_L = torch.stack(sampled.logprobs, dim=1)
        picked_N_L = torch.stack(sampled.tokens, dim=1)
        if picked_N_L.shape != response_N_L.shape or not torch.equal(picked_N_L[response_mask_N_L],
                                                                     response_N_L[response_mask_N_L]):
            raise RuntimeError("generate() did not take the tokens that SampledTokens picked (another logits "
                               "processor ran after it?): their behavior log-probs would be wrong")
        finished_N = is_eos_N_L.any(dim=1)
        attention_mask_N_T = torch.cat([encoded["attention_mask"], response_mask_N_L.long()], dim=1)
        completions = self.tokenizer.batch_decode(  # one call into the tokenizer, not one a row
            [row[mask].tolist() for row, mask in zip(response_N_L.cpu(), response_mask_N_L.cpu())],
            skip_special_tokens=True,
        )
        return Generation(
            tokens_N_T=tokens_N_T,
            attention_mask_N_T=attention_mask_N_T,
            response_mask_N_L=response_mask_N_L,
            behavior_logprobs_N_L=logprobs_N_L * response_mask_N_L,
            finished_N=finished_N,
            completions=completions,
        )


def policy_logprobs(
    model: PreTrainedModel, generation: Generation, temperature: float = 1.0, share_prompts: bool = True,
    skip_padding: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's log pi_theta of the sampled response tokens, and the policy's entropy there.

    Positions follow the attention mask, as in generation, so that left padding does not shift them.
    With `share_prompts`, a prompt repeated over a group runs once (prefix.py). With `skip_padding`,
    no pass is wider than its rows' longest response, and rows much shorter than the rest run in a
    narrower pass (prefix.length_buckets): positions past a row's pass hold 0.
    Returns ([N, L] log-probs with gradient, [N, L] entropy without).
    """
    prompt_width = generation.prompt_width
    parts = []
    for rows, logits_n_W_V in response_logit_parts(model, generation.tokens_N_T, generation.attention_mask_N_T,
                                                   prompt_width, share_prompts, skip_padding):
        width = logits_n_W_V.shape[1]
        log_softmax_n_W_V = torch.log_softmax(logits_n_W_V.float() / temperature, dim=-1)
        response_n_W = take_rows(generation.tokens_N_T, rows)[:, prompt_width : prompt_width + width]
        logprobs_n_W = log_softmax_n_W_V.gather(-1, response_n_W[..., None]).squeeze(-1)
        with torch.no_grad():
            entropy_n_W = -(log_softmax_n_W_V.exp() * log_softmax_n_W_V).sum(dim=-1)
        parts.append((rows, logprobs_n_W, entropy_n_W))
    width = generation.response_mask_N_L.shape[1]
    if len(parts) == 1:  # every row in one pass
        _, logprobs_N_W, entropy_N_W = parts[0]
        return pad_to(logprobs_N_W, width), pad_to(entropy_N_W, width)
    back_N = inverse(torch.cat([rows for rows, _, _ in parts]))  # each row's place among the parts' rows
    logprobs_N_L = torch.cat([pad_to(part, width) for _, part, _ in parts])[back_N]
    entropy_N_L = torch.cat([pad_to(part, width) for _, _, part in parts])[back_N]
    return logprobs_N_L, entropy_N_L


def inverse(order_N: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes order_N: values[order_N][inverse(order_N)] == values."""
    back_N = torch.empty_like(order_N)
    back_N[order_N] = torch.arange(len(order_N), device=order_N.device)
    return back_N


def pad_to(values_n_W: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros appended up to `width` positions (the tensor itself when it is that wide)."""
    if values_n_W.shape[1] == width:
        return values_n_W
    return torch.nn.functional.pad(values_n_W, (0, width - values_n_W.shape[1]))


class RolloutWorker:
    """Makes batch i: P prompts from the train split, G samples each, scored by the task's reward.

    Prompts and sampling noise are seeded by (seed, batch index), so a batch depends only on them
    and on the weights that sampled it. A NaN reward is a failed one (rewards.py): counted in
    ``reward_errors``, then scored 0 or, with `drop_failed_rewards`, masked out of the loss.
    With `recompute_behavior`, the engine re-scores its own samples with the learner's forward pass
    on the weights that sampled them (``engine.score``), which is honest at any lag.
    """

    def __init__(self, engine: RolloutEngine, task: Task, prompts_per_step: int, group_size: int, seed: int,
                 recompute_behavior: bool = False, drop_failed_rewards: bool = False):
        self.engine = engine
        self.task = task
        self.prompts_per_step = prompts_per_step
        self.group_size = group_size
        self.seed = seed
        self.recompute_behavior = recompute_behavior
        self.drop_failed_rewards = drop_failed_rewards

    def produce(self, batch_index: int) -> RolloutBatch:
        rng = np.random.default_rng([self.seed, batch_index])
        prompts = self.task.sample_prompts(rng, self.prompts_per_step)
        texts = [prompt.text for prompt in prompts for _ in range(self.group_size)]
        noise_seed = int(rng.integers(0, 2**62))
        start = time.perf_counter()
        generation = self.engine.generate(texts, noise_seed)
        extras = {}
        if self.recompute_behavior:
            sampler_logprobs_N_L = generation.behavior_logprobs_N_L
            generation.behavior_logprobs_N_L = self.engine.score(generation)
            mask_N_L = generation.response_mask_N_L.float()
            gap = ((sampler_logprobs_N_L - generation.behavior_logprobs_N_L).abs() * mask_N_L).sum()
            extras["sampler_mismatch"] = float(gap / mask_N_L.sum().clamp(min=1))
        gen_s = time.perf_counter() - start
        reward_start = time.perf_counter()
        rewards_N = torch.tensor([
            self.task.reward(prompts[j // self.group_size], completion, bool(finished))
            for j, (completion, finished) in enumerate(zip(generation.completions, generation.finished_N))
        ], dtype=torch.float32)
        extras["reward_s"] = time.perf_counter() - reward_start
        failed_N = ~torch.isfinite(rewards_N)
        extras["reward_errors"] = int(failed_N.sum())
        extras["weight_sync_s"], self.engine.sync_s = self.engine.sync_s, 0.0
        size = len(texts)
        return RolloutBatch(
            batch_index=batch_index,
            version=self.engine.version,
            prompts=prompts,
            group_size=self.group_size,
            generation=generation,
            rewards_N=rewards_N.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0),
            sample_ids=list(range(batch_index * size, (batch_index + 1) * size)),
            gen_s=gen_s,
            extras=extras,
            valid_N=~failed_N if self.drop_failed_rewards and failed_N.any() else None,
        )
