"""ATen operators a decoding step issues: stalerl's engine against a plain sampled `generate`.

    python benchmarks/generate_ops.py [--layers 16] [--tokens 32]

On a GPU eager decoding is bound by launching kernels one by one from Python, so the operator count
per step is what the engine's overhead costs there. This counts it on CPU, with a random Llama of
Llama-3.2-1B's layout (16 layers, grouped-query attention, tied embeddings) made narrow so it runs
in seconds; the count depends on the layout, not the width. Same batch as `stalerl bench`'s `gen`
part on a checkpoint: 8 prompts of data/gsm8k_sample.jsonl x 8 samples.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stalerl import random_checkpoint
from stalerl.bench.plan import CHECKPOINT_DEFAULTS, base_config
from stalerl.config import TrainConfig, override
from stalerl.data import build_task
from stalerl.policy import build_policy, build_rollout_engine

DATA = Path(__file__).resolve().parent.parent / "data" / "gsm8k_sample.jsonl"


class OperatorCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def generation_calls(config: TrainConfig, tokens: int) -> dict[str, Callable[[], int]]:
    """The bench's `gen` batch through stalerl's engine (a group's prompt shared, and prompts whole)
    and a plain sampled `generate`; each call returns its number of decoding steps."""
    model, tokenizer, _ = build_policy(config)
    model.eval()
    task = build_task(config, tokenizer)
    prompts = task.sample_prompts(np.random.default_rng([0, 0]), config.rollout.prompts_per_step)
    texts = [prompt.text for prompt in prompts for _ in range(config.rollout.group_size)]

    def engine(changes: dict) -> Callable[[], int]:
        built = build_rollout_engine(override(config, changes), model, tokenizer)
        return lambda: built.generate(texts, noise_seed=1).response_mask_N_L.shape[1]

    @torch.no_grad()
    def plain() -> int:
        encoded = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        sequences = model.generate(**encoded, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=tokens,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        tokenizer.batch_decode(sequences[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        return sequences.shape[1] - encoded["input_ids"].shape[1]

    return {"stalerl (a group's prompt shared)": engine({}),
            "stalerl (prompts whole)": engine({"model.share_prompt_prefix": False}),
            "plain generate": plain}


def checkpoint_config(checkpoint: Path | str, data: Path | str, tokens: int) -> TrainConfig:
    """The bench's config for a checkpoint on the math task (8 prompts x 8 samples)."""
    return base_config(**(CHECKPOINT_DEFAULTS | {"model.name_or_path": str(checkpoint), "task.data": str(data),
                                                 "rollout.max_new_tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random_checkpoint.SHAPES["narrow"] = {**random_checkpoint.SHAPES["llama-3.2-1b"], "hidden_size": 64,
                                          "intermediate_size": 128, "num_attention_heads": 4,
                                          "num_key_value_heads": 2, "vocab_size": 2048,
                                          "num_hidden_layers": args.layers}
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "narrow"
        random_checkpoint.save_random_checkpoint("narrow", path, DATA)
        for name, call in generation_calls(checkpoint_config(path, DATA, args.tokens), args.tokens).items():
            call()  # warm-up
            with OperatorCount() as counter:
                steps = call()
            total = sum(counter.count.values())
            print(f"{name:36s} {total:7d} operators, {steps} steps: {total / steps:6.0f} a step")


if __name__ == "__main__":
    main()
