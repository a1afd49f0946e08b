"""What slows the learner and the sampler down when they overlap: the GIL, or the shared machine?

    python benchmarks/contention.py [--seconds 8] [--repeats 3]

Times the embedded default's learner step (on fixed batches) and its rollout batch (sampling and
reward) three ways, one torch thread each: alone, one after the other; at once in two threads of
one process (how the local runtime overlaps them); and at once in two processes. Two threads share
one GIL, two processes share only the cores and the memory system, so the difference between the
second and third rows is what the GIL costs. Each way runs `--seconds` per repeat, the ways
alternate within a repeat, and medians over all calls are printed (and --json FILE).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

Call = Callable[[int], object]


def build_calls() -> tuple[Call, Call]:
    """(learner step on one of 8 fixed batches, one rollout batch) on the embedded default."""
    from stalerl.bench.plan import base_config
    from stalerl.learner import learner_step, make_optimizer
    from stalerl.policy import build_policy
    from stalerl.train import build_rollout_worker, build_task

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = base_config(steps=10)
    model, tokenizer, _ = build_policy(config)
    worker = build_rollout_worker(config, model, tokenizer, build_task(config, tokenizer))
    batches = [worker.produce(index) for index in range(8)]
    optimizer = make_optimizer(model, config.optim)

    def learn(index: int) -> object:
        return learner_step(model, optimizer, batches[index % len(batches)], config.loss, config.optim,
                            config.rollout)

    def sample(index: int) -> object:
        return worker.produce(1000 + index)

    for index in range(3):  # warm-up: allocator, caches
        learn(index)
        sample(index)
    return learn, sample


def timed_calls(call: Call, seconds: float) -> list[float]:
    times, index, end = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        call(index)
        times.append(time.perf_counter() - start)
        index += 1
    return times


def in_two_threads(learn: Call, sample: Call, seconds: float) -> tuple[list[float], list[float]]:
    sampled: list[float] = []
    thread = threading.Thread(target=lambda: sampled.extend(timed_calls(sample, seconds)))
    thread.start()
    learned = timed_calls(learn, seconds)
    thread.join()
    return learned, sampled


def _process_main(which: str, seconds: float, ready, results) -> None:
    learn, sample = build_calls()
    ready.wait()  # both processes built and warmed up: start together
    results.put((which, timed_calls(learn if which == "learn" else sample, seconds)))


def in_two_processes(seconds: float) -> tuple[list[float], list[float]]:
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_process_main, args=(which, seconds, ready, results))
                 for which in ("learn", "sample")]
    for process in processes:
        process.start()
    times = dict(results.get() for _ in processes)
    for process in processes:
        process.join()
    return times["learn"], times["sample"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    learn, sample = build_calls()
    times: dict[str, dict[str, list[float]]] = {way: {"learn": [], "sample": []}
                                                for way in ("alone", "two threads", "two processes")}
    for _ in range(args.repeats):
        times["alone"]["learn"] += timed_calls(learn, args.seconds / 2)
        times["alone"]["sample"] += timed_calls(sample, args.seconds / 2)
        for way, (learned, sampled) in (("two threads", in_two_threads(learn, sample, args.seconds)),
                                        ("two processes", in_two_processes(args.seconds))):
            times[way]["learn"] += learned
            times[way]["sample"] += sampled
    report = {way: {side: {"median_ms": 1000 * statistics.median(values), "calls": len(values)}
                    for side, values in sides.items()} for way, sides in times.items()}
    alone = report["alone"]
    print(f"{'':15s} {'learner step':>14s} {'rollout batch':>14s}   (medians, ms; x: over alone)")
    for way, sides in report.items():
        cells = [f"{sides[side]['median_ms']:7.1f} {sides[side]['median_ms'] / alone[side]['median_ms']:5.2f}x"
                 for side in ("learn", "sample")]
        print(f"{way:15s} {cells[0]:>14s} {cells[1]:>14s}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "repeats": args.repeats, **report}, indent=2))


if __name__ == "__main__":
    main()
