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

import torch
from torch.profiler import ProfilerActivity, profile

from generate_ops import DATA, checkpoint_config, generation_calls  # this folder is on sys.path when run

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
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--tokens", type=int, default=64)  # 128 took over 70 s on the H100 (profiling costs)
    args = parser.parse_args()
    calls = generation_calls(checkpoint_config(args.model, args.data, args.tokens), args.tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    print(f"{'cuda' if torch.cuda.is_available() else 'cpu'}, the bench's gen batch, up to {args.tokens} new tokens")
    with profile(activities=activities):  # the profiler's own first start (CUPTI) is slower: not counted
        calls["plain generate"]()
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
