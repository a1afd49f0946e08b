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
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from stalerl.config import ConfigError, ModelConfig, TrainConfig, one_line
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
    index = config.model.device.partition(":")[2]
    if config.model.device.startswith("cuda:") and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"model.device: {config.model.device} asked for but {torch.cuda.device_count()} CUDA "
                          f"GPU(s) are visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if config.model.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("model.device: mps asked for but Apple's MPS backend is not available here")
    device = resolve_device(config.model)
    if config.runtime.rollout_cuda_stream == "own" and device.type != "cuda":
        raise ConfigError(f"runtime.rollout_cuda_stream: own needs the model on a CUDA GPU (model.device "
                          f"{config.model.device} runs it on {device.type} here)")


# What transformers reads a local checkpoint's config and weights from (a peft adapter directory has
# its own pair, and transformers loads it with its base model).
CONFIG_FILES = ("config.json", "adapter_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "adapter_model.safetensors", "adapter_model.bin", "tf_model.h5", "flax_model.msgpack")


def check_model_files(model: ModelConfig) -> None:
    """A local model.name_or_path that cannot be a checkpoint, in one line, before the run directory
    exists: no directory, no config or no weights (named); then its tokenizer, which loads in well
    under a second, so that its error comes here too and not after the run has started."""
    if not model.name_or_path:
        return
    if is_missing_directory(model.name_or_path):
        raise ConfigError(f"model.name_or_path: directory not found: {model.name_or_path}")
    path = Path(model.name_or_path).expanduser()
    if not path.is_dir():  # a hub name
        return
    for what, names in (("config", CONFIG_FILES), ("weights", WEIGHT_FILES)):
        if not any((path / name).is_file() for name in names):
            raise ConfigError(f"model.name_or_path: {model.name_or_path} is not a Hugging Face checkpoint directory: "
                              f"it has no {what} file ({', '.join(names)})")
    load_tokenizer(model)


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
    hf_logging.disable_progress_bar()
    try:
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
    finally:
        hf_logging.enable_progress_bar()


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be asked now (offline mode, no route to it), or None: try it.

    A TCP connection to the endpoint; skipped (None) behind a proxy, where only the proxy can tell.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return f"{host} cannot be reached: {error.strerror or type(error).__name__}"
    return None


def is_missing_directory(path: str) -> bool:
    """A path that is meant as a local directory (not a hub name) and is not one."""
    # A hub name is NAME or NAMESPACE/NAME: a path with two separators can only be local.
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") >= 2 or "\\" in path
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
    hf_logging.disable_progress_bar()  # a shard bar per run is noise in a sweep's log
    try:
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
    finally:
        hf_logging.enable_progress_bar()


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
