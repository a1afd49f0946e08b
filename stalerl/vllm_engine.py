"""The vLLM rollout engine (GPU, extra ``stalerl[vllm]``): same interface as TransformersEngine.

    stalerl train --config configs/llama-3.2-1b-gsm8k.yaml --set rollout.engine=vllm

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a new policy version is
loaded into the running engine by calling the model's own ``load_weights`` on the worker through
``LLM.collective_rpc``: no restart, no serialisation, no file. Each sync is timed (``weight_sync_s``).

Behavior log-probs are vLLM's per-token log-probs of the sampled tokens (``SamplingParams.logprobs``)
*after* temperature scaling (``logprobs_mode="processed_logprobs"``), i.e. log mu at temperature T.
Their gap to the learner's recomputation is the sampler/learner numeric mismatch, logged as
``logprob_mismatch`` (at lag 0) or, with ``rollout.recompute_behavior_logprobs``, as
``sampler_mismatch`` at any lag; the recomputation then runs on a private transformers copy of the
behavior weights kept beside vLLM (twice the weight memory).

Written against vLLM's V1 ``LLM`` API; it runs only on a CUDA machine and is covered by the tests
marked ``gpu``, which skip elsewhere.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stalerl.config import ConfigError
from stalerl.rollout import Generation, policy_logprobs


def check_vllm_usable(device: str) -> None:
    """Raises a one-line ConfigError, before any work, when vLLM cannot run here."""
    if device == "cpu":
        raise ConfigError("rollout.engine: vllm needs a CUDA GPU but model.device is cpu; "
                          "use rollout.engine=transformers")
    if not torch.cuda.is_available():
        raise ConfigError("rollout.engine: vllm needs a CUDA GPU and none is visible; "
                          "use rollout.engine=transformers (runs on CPU)")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine: vllm is not installed; pip install 'stalerl[vllm]'")


def _load_weights_on_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs on vLLM's worker (in this process): the model's load_weights maps HF names itself."""
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMEngine:
    """Samples with vLLM; ``load_weights`` swaps the policy in place. See the module doc."""

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        temperature: float,
        dtype: str,
        device: torch.device,
        gpu_memory_utilization: float,
        trust_remote_code: bool = False,
        scoring_model: PreTrainedModel | None = None,
        seed: int = 0,
        share_prompts: bool = True,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights by reference
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            seed=seed,
            logprobs_mode="processed_logprobs",  # log-probs of softmax(logits / T), the behavior policy
            enable_prefix_caching=True,  # a group's G samples share their prompt
        )
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = device
        self.version = 0
        self.sync_s = 0.0  # weight-sync time since the last batch (the worker reads and resets it)
        # A transformers copy of the behavior weights, only for recompute_behavior_logprobs.
        self.scoring_model = copy.deepcopy(scoring_model).eval() if scoring_model is not None else None
        self.share_prompts = share_prompts  # the scoring forward's prompt sharing (prefix.py)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        start = time.perf_counter()
        weights = [(name, tensor.to(self.device)) for name, tensor in state_dict.items()]
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        if self.scoring_model is not None:
            self.scoring_model.load_state_dict(state_dict)
        torch.cuda.synchronize()
        self.sync_s += time.perf_counter() - start
        self.version = version

    @torch.no_grad()
    def score(self, generation: Generation) -> torch.Tensor:
        """log mu by the learner's forward pass on the behavior weights (recompute_behavior_logprobs)."""
        if self.scoring_model is None:
            raise RuntimeError("VLLMEngine was built without a scoring model")
        logprobs_N_L, _ = policy_logprobs(self.scoring_model, generation, self.temperature, self.share_prompts)
        return logprobs_N_L * generation.response_mask_N_L

    def generate(self, prompts: list[str], noise_seed: int | None) -> Generation:
        """One response per prompt string; greedy when ``noise_seed`` is None (validation)."""
        from vllm import SamplingParams

        greedy = noise_seed is None
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else self.temperature,
                max_tokens=self.max_new_tokens,
                logprobs=0,  # the sampled token's log-prob only
                seed=None if greedy else (noise_seed + i) % 2**63,  # per-sample seed: reproducible batches
            )
            for i in range(len(prompts))
        ]
        prompt_ids = [self.tokenizer(text).input_ids for text in prompts]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return self._to_generation(prompt_ids, [output.outputs[0] for output in outputs])

    def _to_generation(self, prompt_ids: list[list[int]], completions: list) -> Generation:
        """vLLM's ragged outputs -> the left-padded prompt block + right-padded responses layout."""
        pad_id = self.tokenizer.pad_token_id
        prompt_width = max(len(ids) for ids in prompt_ids)
        length = max(1, max(len(c.token_ids) for c in completions))
        count = len(prompt_ids)
        tokens_N_T = torch.full((count, prompt_width + length), pad_id, dtype=torch.long)
        attention_mask_N_T = torch.zeros((count, prompt_width + length), dtype=torch.long)
        behavior_logprobs_N_L = torch.zeros((count, length))
        finished_N = torch.zeros(count, dtype=torch.bool)
        for i, (ids, completion) in enumerate(zip(prompt_ids, completions)):
            response = list(completion.token_ids)
            tokens_N_T[i, prompt_width - len(ids): prompt_width] = torch.tensor(ids)
            attention_mask_N_T[i, prompt_width - len(ids): prompt_width] = 1
            if response:
                tokens_N_T[i, prompt_width: prompt_width + len(response)] = torch.tensor(response)
                attention_mask_N_T[i, prompt_width: prompt_width + len(response)] = 1
                behavior_logprobs_N_L[i, : len(response)] = torch.tensor(
                    [step[token].logprob for step, token in zip(completion.logprobs, response)])
            finished_N[i] = completion.finish_reason == "stop"
        response_mask_N_L = attention_mask_N_T[:, prompt_width:].bool()
        return Generation(
            tokens_N_T=tokens_N_T.to(self.device),
            attention_mask_N_T=attention_mask_N_T.to(self.device),
            response_mask_N_L=response_mask_N_L.to(self.device),
            behavior_logprobs_N_L=behavior_logprobs_N_L.to(self.device),
            finished_N=finished_N,
            completions=[completion.text for completion in completions],
        )
