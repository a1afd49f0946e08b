"""The policy a run trains: the embedded tiny Llama, or any Hugging Face causal LM and its tokenizer.

    stalerl train --model path/to/checkpoint --task math --data data/gsm8k_sample.jsonl

A checkpoint is loaded with transformers' Auto classes (a local directory; a hub name is passed
through to ``from_pretrained`` for users who have a hub), never running code it ships unless
``model.trust_remote_code`` says so. At the end of a run the final policy is saved the same way
(safetensors + tokenizer), so ``AutoModelForCausalLM.from_pretrained(RUN/final)`` loads it back.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from stalerl.config import ConfigError, ModelConfig, TrainConfig
from stalerl.model import count_parameters
from stalerl.rollout import RolloutEngine, TransformersEngine
from stalerl.warmstart import warm_started_policy


def resolve_device(model: ModelConfig) -> torch.device:
    if model.device != "auto":
        return torch.device(model.device)
    # The embedded tiny model is faster on CPU than a GPU's kernel launches.
    return torch.device("cuda" if model.name_or_path and torch.cuda.is_available() else "cpu")


def resolve_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    if model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, model.dtype)


def check_hardware(config: TrainConfig) -> None:
    """What validate() cannot check on any machine (a config may be read where it will not run)."""
    if config.rollout.engine == "vllm":
        from stalerl.vllm_engine import check_vllm_usable  # imports torch, not vllm

        check_vllm_usable(config.model.device)
    if config.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {config.model.device} asked for but no CUDA GPU is visible")


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
    path = config.name_or_path
    if is_missing_directory(path):
        raise ConfigError(f"model.name_or_path: directory not found: {path}")
    device = resolve_device(config)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(config, device), trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:  # no such hub name, no weights, an unknown architecture
        raise ConfigError(f"model.name_or_path: cannot load {path}: {str(error).splitlines()[0]}") from None
    finally:
        hf_logging.enable_progress_bar()
    # Batched generation needs left padding and a pad token (Llama 3 has none: reuse end-of-sequence).
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model.name_or_path: the tokenizer of {path} has no end-of-sequence token")
    model = model.to(device).eval()  # eval: no dropout, so the learner's log-probs match the sampler's
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False  # the learner's forward needs no KV cache; generate() asks for one
    return model, tokenizer


def is_missing_directory(path: str) -> bool:
    """A path that is meant as a local directory (not a hub name) and is not one."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    return looks_local and not Path(path).expanduser().is_dir()


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
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
        target_modules=targets if targets == "all-linear" else [name.strip() for name in targets.split(",")],
    )
    return get_peft_model(model, lora)


def save_final(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, lora: bool) -> None:
    """The final policy as a plain Hugging Face checkpoint (LoRA merged in), safetensors + tokenizer."""
    if lora:  # a peft model: save the merged weights, loadable without peft
        model = copy.deepcopy(model).merge_and_unload()
    hf_logging.disable_progress_bar()  # a shard bar per run is noise in a sweep's log
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)


def build_rollout_engine(config: TrainConfig, model: PreTrainedModel,
                         tokenizer: PreTrainedTokenizerBase) -> RolloutEngine:
    """The rollout worker's engine with its own copy of the policy (rollout.engine)."""
    rollout = config.rollout
    if rollout.engine == "vllm":
        from stalerl.vllm_engine import VLLMEngine

        device = next(model.parameters()).device
        return VLLMEngine(
            config.model.name_or_path, tokenizer, rollout.max_new_tokens, rollout.temperature,
            dtype=str(resolve_dtype(config.model, device)).removeprefix("torch."), device=device,
            gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
            trust_remote_code=config.model.trust_remote_code,
            scoring_model=model if rollout.recompute_behavior_logprobs else None, seed=config.seed,
            share_prompts=config.model.share_prompt_prefix,
        )
    return TransformersEngine(copy.deepcopy(model), tokenizer, rollout.max_new_tokens, rollout.temperature,
                              config.model.share_prompt_prefix, rollout.static_cache)
