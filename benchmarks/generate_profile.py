"""Where one `generate` call's time goes: stalerl's engine against a plain sampled `generate`.

    python benchmarks/generate_profile.py --model DIR --data data/gsm8k_sample.jsonl [--tokens 64]

The same batch as `stalerl bench`'s `gen` part (8 prompts x 8 samples), each call profiled once
after a warm-up call, on the GPU where there is one. For each call it prints the wall time, the
kernels launched and the host-device synchronisations a decoding step, the GPU's busy time (the
kernels' own time) as a share of the wall time, and the operators that take the most host time.
With a GPU busy a small share of the wall, decoding is bound by the host (Python and kernel
launches), and every operator the host issues a step costs time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from stalerl.bench import CHECKPOINT_DEFAULTS, base_config
from stalerl.config import override
from stalerl.data import build_task
from stalerl.policy import build_policy, build_rollout_engine

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def device_time(event) -> float:  # microseconds; the field's name changed across torch versions
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def report(name: str, prof, wall_s: float, steps: int) -> None:
    averages = prof.key_averages()
    launches = sum(event.count for event in averages if event.key in LAUNCHES)
    syncs = sum(event.count for event in averages if event.key in SYNCS)
    kernel_s = sum(device_time(event) for event in averages if event.device_type.name == "CUDA") / 1e6
    print(f"{name}: {wall_s:.3f} s, {steps} steps ({wall_s / steps * 1e3:.2f} ms a step); "
          f"{launches / steps:.0f} kernel launches and {syncs / steps:.1f} synchronisations a step; "
          f"GPU busy {kernel_s:.3f} s ({kernel_s / wall_s:.0%} of the wall)")
    top = sorted((event for event in averages if event.device_type.name == "CPU"),
                 key=lambda event: event.self_cpu_time_total, reverse=True)[:10]
    for event in top:
        print(f"    {event.key[:48]:48s} {event.count / steps:7.1f} a step  host {event.self_cpu_time_total / 1e3:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face checkpoint directory")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "data" / "gsm8k_sample.jsonl"))
    parser.add_argument("--tokens", type=int, default=64)  # 128 took over 70 s on the H100 (profiling costs)
    args = parser.parse_args()
    config = base_config(**(CHECKPOINT_DEFAULTS | {"model.name_or_path": args.model, "task.data": args.data,
                                                   "rollout.max_new_tokens": args.tokens}))
    model, tokenizer, _ = build_policy(config)
    model.eval()
    task = build_task(config, tokenizer)
    prompts = task.sample_prompts(np.random.default_rng([0, 0]), config.rollout.prompts_per_step)
    texts = [prompt.text for prompt in prompts for _ in range(config.rollout.group_size)]

    def engine(changes: dict):
        built = build_rollout_engine(override(config, changes), model, tokenizer)
        return lambda: built.generate(texts, noise_seed=1).response_mask_N_L.shape[1]

    @torch.no_grad()
    def plain() -> int:
        encoded = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        sequences = model.generate(**encoded, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=args.tokens,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        tokenizer.batch_decode(sequences[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        return sequences.shape[1] - encoded["input_ids"].shape[1]

    calls = {"stalerl (a group's prompt shared)": engine({}),
             "stalerl (prompts whole)": engine({"model.share_prompt_prefix": False}),
             "plain generate": plain}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    print(f"device {model.device}, {len(texts)} rows, up to {args.tokens} new tokens")
    with profile(activities=activities):  # the profiler's own first start (CUPTI) is slower: not counted
        plain()
    for name, call in calls.items():
        call()  # warm-up
        synchronize()
        with profile(activities=activities) as prof:
            began = time.perf_counter()
            steps = call()
            synchronize()
            wall_s = time.perf_counter() - began
        report(name, prof, wall_s, steps)


if __name__ == "__main__":
    main()
