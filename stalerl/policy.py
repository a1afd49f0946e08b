"""The policy a run trains: the embedded tiny Llama, or any Hugging Face causal LM and its tokenizer.

    stalerl train --model path/to/checkpoint --task math --data data/gsm8k_sample.jsonl

A checkpoint is loaded with transformers' Auto classes (a local directory; a hub name is passed
through to ``from_pretrained`` for users who have a hub, and read from the local hub cache only when
the hub cannot be reached), never running code it ships unless
``model.trust_remote_code`` says so. At the end of a run the final policy is saved the same way
(safetensors + tokenizer), so ``AutoModelForCausalLM.from_pretrained(RUN/final)`` loads it back.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stalerl.config import ConfigError, ModelConfig, TrainConfig, one_line
from stalerl.model import count_parameters, quiet_progress_bars
from stalerl.preflight import hub_unreachable, is_missing_directory, resolve_device
from stalerl.rollout import RolloutEngine, TransformersEngine
from stalerl.warmstart import warm_started_policy


def resolve_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    if model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, model.dtype)


def build_policy(config: TrainConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """(model, tokenizer, record): the cached warm-started tiny model when model.name_or_path is empty."""
    if not config.model.name_or_path:
        model, tokenizer, record = warm_started_policy(config)
        return model.to(resolve_device(config.model)), tokenizer, record
    model, tokenizer = load_pretrained(config.model)
    if config.model.lora_rank > 0:
        model = add_lora(model, config.model)
    return model, tokenizer, {"checkpoint": config.model.name_or_path, "parameters": count_parameters(model)}


def load_pretrained(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    offline = hub_access(config.name_or_path)
    tokenizer = load_tokenizer(config, offline)
    device = resolve_device(config)
    model = _from_pretrained(AutoModelForCausalLM, config, offline, dtype=resolve_dtype(config, device))
    model = model.to(device).eval()  # eval: no dropout, so the learner's log-probs match the sampler's
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False  # the learner's forward needs no KV cache; generate() asks for one
    return model, tokenizer


def load_tokenizer(config: ModelConfig, offline: str | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, set up for batched generation (a vLLM rollout actor needs only it)."""
    tokenizer = _from_pretrained(AutoTokenizer, config, offline)
    # Batched generation needs left padding and a pad token (Llama 3 has none: reuse end-of-sequence).
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model.name_or_path: the tokenizer of {config.name_or_path} has no end-of-sequence token")
    return tokenizer


def hub_access(path: str) -> str | None:
    """None, or why only the local hub cache may be read. A path that is not a directory here is a
    hub name; without a reachable hub, huggingface_hub retries for ~50 s before it fails."""
    if is_missing_directory(path):
        raise ConfigError(f"model.name_or_path: directory not found: {path}")
    return None if Path(path).expanduser().is_dir() else hub_unreachable()


def _from_pretrained(auto_class: type, config: ModelConfig, offline: str | None, **kwargs):
    path = config.name_or_path
    try:
        with quiet_progress_bars():
            return auto_class.from_pretrained(path, trust_remote_code=config.trust_remote_code,
                                              local_files_only=offline is not None, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # no such hub name, no weights, an unknown
        # architecture, a truncated model.safetensors
        reason = one_line(error)
        if Path(path).expanduser().is_dir():
            raise ConfigError(f"model.name_or_path: cannot load {path}: {reason}") from None
        if offline is not None:
            reason = f"{offline}, and it is not in the local hub cache"
        raise ConfigError(f"model.name_or_path: {path} is neither a local directory nor loadable from the "
                          f"Hugging Face hub ({reason})") from None


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    # transformers renamed it activation_checkpointing_enable late in 5.x; older 5.x has only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def add_lora(model: PreTrainedModel, config: ModelConfig) -> PreTrainedModel:
    """Wraps the model with peft LoRA adapters; only the adapters train (extra ``stalerl[lora]``)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("model.lora_rank: LoRA needs peft; pip install 'stalerl[lora]'") from None
    targets = config.lora_target_modules
    names = targets if targets == "all-linear" else [name.strip() for name in targets.split(",")]
    if names != "all-linear":  # peft accepts a list if any one name matches; a typo elsewhere would train nothing
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [name for name in names if name.rsplit(".", 1)[-1] not in leaves]
        if unknown:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, torch.nn.Linear)})
            raise ConfigError(f"model.lora_target_modules: {', '.join(map(repr, unknown))} matches no module of "
                              f"the model (its linear layers: {', '.join(linear)}; or all-linear)")
    try:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          task_type="CAUSAL_LM", target_modules=names)
        return get_peft_model(model, lora)
    except (ValueError, TypeError, KeyError) as error:  # peft's PeftError is a ValueError
        raise ConfigError(f"model.lora_target_modules: peft cannot wrap {targets!r} "
                          f"({type(error).__name__}: {str(error).splitlines()[0]})") from None


def save_final(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, lora: bool) -> None:
    """The final policy as a plain Hugging Face checkpoint (LoRA merged in), safetensors + tokenizer."""
    if lora:  # a peft model: save the merged weights, loadable without peft
        model = copy.deepcopy(model).merge_and_unload()
    try:
        with quiet_progress_bars():  # a shard bar per run is noise in a sweep's log
            model.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(path, ignore_errors=True)  # a half-written checkpoint is no checkpoint: the space back
        if isinstance(error, OSError):
            raise
        # safetensors' own error type, with the OS's code in its text: "... (os error 28)"
        code = re.search(r"os error (\d+)", str(error))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number) if code else one_line(error), str(path)) from error


def build_rollout_engine(config: TrainConfig, model: PreTrainedModel | None,
                         tokenizer: PreTrainedTokenizerBase) -> RolloutEngine:
    """The rollout worker's engine with its own copy of the policy (rollout.engine). vLLM loads the
    checkpoint itself: `model` (None in a rollout actor) is used only to recompute behavior log-probs."""
    rollout = config.rollout
    if rollout.engine == "vllm":
        from stalerl.vllm_engine import VLLMEngine

        device = next(model.parameters()).device if model is not None else resolve_device(config.model)
        return VLLMEngine(
            config.model.name_or_path, tokenizer, rollout.max_new_tokens, rollout.temperature,
            dtype=str(resolve_dtype(config.model, device)).removeprefix("torch."), device=device,
            gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
            trust_remote_code=config.model.trust_remote_code,
            scoring_model=model if rollout.recompute_behavior_logprobs else None, seed=config.seed,
            share_prompts=config.model.share_prompt_prefix, stop_tokens=rollout.stop_tokens,
        )
    return TransformersEngine(copy.deepcopy(model), tokenizer, rollout.max_new_tokens, rollout.temperature,
                              config.model.share_prompt_prefix, rollout.static_cache, rollout.stop_tokens)
