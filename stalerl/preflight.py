"""What a run checks before its directory exists or anything loads, each a one-line ConfigError.

Kept apart from the modules that load models (policy.py, train.py), so that a process that only
starts runs (a sweep's driver) checks their inputs without importing transformers' models (4.5 s
of CPU a process on a 2-core machine).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from stalerl.config import ConfigError, ModelConfig, TrainConfig
from stalerl.data import check_task_inputs


def check_inputs(config: TrainConfig) -> None:
    """What a run checks before its directory exists or a model loads."""
    check_hardware(config)  # e.g. vLLM without a GPU
    check_task_inputs(config)  # a bad data line or reward spec: before a model loads or a warm start trains
    check_model_files(config.model)  # a checkpoint directory without config.json, a tokenizer or weights


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


def resolve_device(model: ModelConfig) -> torch.device:
    if model.device != "auto":
        return torch.device(model.device)
    # The embedded tiny model is faster on CPU than a GPU's kernel launches.
    return torch.device("cuda" if model.name_or_path and torch.cuda.is_available() else "cpu")


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
    from stalerl.policy import load_tokenizer  # transformers' tokenizers: only for a checkpoint

    load_tokenizer(model)


def is_missing_directory(path: str) -> bool:
    """A path that is meant as a local directory (not a hub name) and is not one."""
    # A hub name is NAME or NAMESPACE/NAME: a path with two separators can only be local.
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") >= 2 or "\\" in path
    return looks_local and not Path(path).expanduser().is_dir()


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
