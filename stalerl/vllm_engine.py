"""The vLLM rollout engine (GPU, extra ``stalerl[vllm]``): same interface as TransformersEngine.

    stalerl train --config configs/llama-3.2-1b-gsm8k.yaml --set rollout.engine=vllm

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a new policy version is
loaded into the running engine by calling the model's own ``load_weights`` on the worker through
``LLM.collective_rpc``: no restart, no serialisation, no file. Each sync is timed (``weight_sync_s``)
and ends by emptying vLLM's prefix cache: its cached prompt KV was computed by the old weights, and
reusing it would sample version k+1 partly with version k's attention keys and values (vllm#9744).

The sampling contract is the transformers engine's (rollout.py, ``Generation``): mu is
softmax(logits / T) alone, and a response ends at the first of the same stop ids
(``rollout.response_stop_ids``: the tokenizer's end-of-sequence, the checkpoint's
``generation_config.json`` ids, ``rollout.stop_tokens``). Each request ignores vLLM's own EOS
handling and names those ids itself, so that both engines stop on one list whatever vLLM's version
reads from the checkpoint. ``finished`` is read from the last token, not from vLLM's finish reason
(older versions report "length" for an EOS sampled at exactly max_tokens), and completions are
decoded by the same tokenizer call as the transformers engine's.

Behavior log-probs are vLLM's per-token log-probs of the sampled tokens (``SamplingParams.logprobs``)
*after* temperature scaling (``logprobs_mode="processed_logprobs"``), i.e. log mu at temperature T.
Their gap to the learner's recomputation is the sampler/learner numeric mismatch, logged as
``logprob_mismatch`` (at lag 0) or, with ``rollout.recompute_behavior_logprobs``, as
``sampler_mismatch`` at any lag; the recomputation then runs on a private transformers copy of the
behavior weights kept beside vLLM (twice the weight memory).

``close()`` shuts the engine down and frees what vLLM lets go of; in process it does not give back
all of it (vllm#21073), so a process that needs another vLLM afterwards should be a fresh one (the
Ray runtime's actors and a Ray sweep's cells are).

Written against vLLM's V1 ``LLM`` API; it runs only on a CUDA machine and is covered by the tests
marked ``gpu``, which skip elsewhere (the plumbing is tested on CPU against a stub ``vllm``).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import os
import time
from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from stalerl.config import ConfigError
from stalerl.rollout import Generation, policy_logprobs, response_stop_ids

IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"
_open_engines = 0  # VLLMEngines alive in this process: they share vLLM's process-wide parallel state


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
    check_in_process()


def check_in_process() -> None:
    """The weight sync hands CUDA tensors to vLLM's worker by reference: the engine must run here."""
    if os.environ.get(IN_PROCESS, "0") != "0":
        raise ConfigError(f"rollout.engine: vllm runs in process (weights synced by reference), but "
                          f"{IN_PROCESS}={os.environ[IN_PROCESS]}; unset it or set it to 0")


def checkpoint_generation_config(model_path: str) -> GenerationConfig | None:
    """The checkpoint's generation_config.json, for its stop ids; None where it has none. Read after
    vLLM has loaded the checkpoint, so a hub model's file is in the local cache by then."""
    try:
        return GenerationConfig.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError):
        return None


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
        stop_tokens: Sequence[str] = (),
    ):
        global _open_engines
        check_in_process()
        os.environ[IN_PROCESS] = "0"  # read when the engine starts: EngineCore in this process
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            seed=seed,
            logprobs_mode="processed_logprobs",  # log-probs of softmax(logits / T), the behavior policy
            enable_prefix_caching=True,  # a group's G samples share their prompt (emptied at each sync)
            generation_config="vllm",  # no sampling defaults from the checkpoint (stop ids: see generate)
        )
        _open_engines += 1
        self.tokenizer = tokenizer
        self.stop_ids = response_stop_ids(tokenizer, checkpoint_generation_config(model_path), stop_tokens)
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
        # Prompt KV cached under the old weights must not be reused (vllm#9744). vLLM refuses while
        # requests run; none do between batches. Some versions return None (no verdict), only False fails.
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError(f"vLLM did not reset its prefix cache after loading version {version}: "
                               "its cached prompts would be sampled with the old weights")
        if self.scoring_model is not None:
            self.scoring_model.load_state_dict(state_dict)
        if self.device.type == "cuda":  # the copies run asynchronously: wait, so that sync_s is their time
            torch.cuda.synchronize(self.device)
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
                # The transformers engine's stop ids and no others (see the module doc).
                ignore_eos=True,
                stop_token_ids=self.stop_ids,
            )
            for i in range(len(prompts))
        ]
        prompt_ids = [self.tokenizer(text).input_ids for text in prompts]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return self._to_generation(prompt_ids, [output.outputs[0] for output in outputs])

    def _to_generation(self, prompt_ids: list[list[int]], completions: list) -> Generation:
        """vLLM's ragged outputs -> the left-padded prompt block + right-padded responses layout."""
        pad_id, stop_ids = self.tokenizer.pad_token_id, set(self.stop_ids)
        responses = []
        for completion in completions:  # up to and including the first stop id (Generation's contract)
            response = list(completion.token_ids)
            end = next((i + 1 for i, token in enumerate(response) if token in stop_ids), len(response))
            responses.append(response[:end])
        prompt_width = max(len(ids) for ids in prompt_ids)
        length = max(1, max(len(response) for response in responses))
        count = len(prompt_ids)
        tokens_N_T = torch.full((count, prompt_width + length), pad_id, dtype=torch.long)
        attention_mask_N_T = torch.zeros((count, prompt_width + length), dtype=torch.long)
        behavior_logprobs_N_L = torch.zeros((count, length))
        finished_N = torch.zeros(count, dtype=torch.bool)
        for i, (ids, response, completion) in enumerate(zip(prompt_ids, responses, completions)):
            tokens_N_T[i, prompt_width - len(ids): prompt_width] = torch.tensor(ids)
            attention_mask_N_T[i, prompt_width - len(ids): prompt_width] = 1
            if response:
                tokens_N_T[i, prompt_width: prompt_width + len(response)] = torch.tensor(response)
                attention_mask_N_T[i, prompt_width: prompt_width + len(response)] = 1
                behavior_logprobs_N_L[i, : len(response)] = torch.tensor(
                    [step[token].logprob for step, token in zip(completion.logprobs, response)])
                finished_N[i] = response[-1] in stop_ids  # not finish_reason: see the module doc
        response_mask_N_L = attention_mask_N_T[:, prompt_width:].bool()
        return Generation(
            tokens_N_T=tokens_N_T.to(self.device),
            attention_mask_N_T=attention_mask_N_T.to(self.device),
            response_mask_N_L=response_mask_N_L.to(self.device),
            behavior_logprobs_N_L=behavior_logprobs_N_L.to(self.device),
            finished_N=finished_N,
            # The transformers engine's decoding, EOS and special tokens removed.
            completions=self.tokenizer.batch_decode(responses, skip_special_tokens=True),
        )

    def close(self) -> None:
        """Shuts vLLM down and frees the GPU memory it lets go of in this process (module doc).

        The process-wide parallel state (torch.distributed, vLLM's groups) is torn down only with
        the last engine of the process: another engine still running uses it."""
        global _open_engines
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()  # executor and worker: model and KV cache
        self.llm = None
        self.scoring_model = None
        _open_engines -= 1
        if _open_engines == 0:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()  # destroy_model_parallel, destroy_distributed_environment, gc, empty_cache
        else:
            gc.collect()
            torch.cuda.empty_cache()
