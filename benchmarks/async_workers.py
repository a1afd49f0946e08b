"""The async rows of `stalerl bench` for chosen rollout workers only, alternated and repeated, so that two
workers' rates can be compared within a few minutes of GPU time (the bench's async part also runs S = 0
and the process worker, 4 runs of start-up and compilation a repeat):

    python benchmarks/async_workers.py --model CKPT --data data/gsm8k_sample.jsonl \
        --workers thread,own_stream --staleness 1 --steps 20 --repeats 2 --set rollout.static_cache=true

Workers: thread, process, own_stream (a CUDA GPU). Each run is the bench's (stalerl/bench/overlap.py):
a fresh process, validation only at the ends, the first steps untimed. Prints each run's steps/s and its
sides' median times, then each worker's median rate and its ratio to the first worker's (with
--json FILE, writes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from stalerl.bench.overlap import WORKER_SETTINGS, async_config, sides_rate
from stalerl.bench.plan import WARMUP_STEPS
from stalerl.bench.runs import isolated, train_run
from stalerl.bench.suite import checked_model_settings
from stalerl.config import parse_assignment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory (random:SHAPE is not made here)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--workers", default="thread,own_stream", help=f"comma-separated: {', '.join(WORKER_SETTINGS)}")
    parser.add_argument("--staleness", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workers = args.workers.split(",")
    unknown = [worker for worker in workers if worker not in WORKER_SETTINGS]
    if unknown:
        parser.error(f"--workers: unknown {unknown[0]!r} (known: {', '.join(WORKER_SETTINGS)})")
    if args.staleness < 1 or args.steps < WARMUP_STEPS + 2:
        parser.error(f"--staleness must be >= 1, and --steps >= {WARMUP_STEPS + 2} (the first {WARMUP_STEPS} are not timed)")
    model = checked_model_settings(args.model, args.data, dict(parse_assignment(text) for text in args.set), ("async",))

    runs: dict[str, list[dict]] = {worker: [] for worker in workers}
    with tempfile.TemporaryDirectory(prefix="stalerl-async-workers-") as tmp:
        for repeat in range(args.repeats):
            # alternating, and in the other order on odd repeats: a drift of the machine hits all alike
            for worker in workers if repeat % 2 == 0 else workers[::-1]:
                config = async_config(args.steps, model, args.staleness, worker, Path(tmp) / f"{worker}-r{repeat}")
                run = isolated(train_run, config.to_dict(), WARMUP_STEPS)
                runs[worker].append(run)
                print(f"repeat {repeat} {worker:10s} {run['steps_per_s']:.3f} steps/s (sides allow "
                      f"{sides_rate(args.staleness, run['rollout_s'], run['train_s']):.3f}: rollout batch "
                      f"{run['rollout_s']:.3f} s, learner step {run['train_s']:.3f} s), wall {run['wall_s']:.1f} s",
                      flush=True)
    first = statistics.median(run["steps_per_s"] for run in runs[workers[0]])
    summary = {}
    for worker in workers:
        rate = statistics.median(run["steps_per_s"] for run in runs[worker])
        summary[worker] = {"steps_per_s": rate, "over_first": rate / first, "runs": runs[worker]}
        print(f"{worker:10s} median {rate:.3f} steps/s, {rate / first:.3f}x {workers[0]}")
    if args.json:
        args.json.write_text(json.dumps({"staleness": args.staleness, "steps": args.steps, "model": model,
                                         "workers": summary}, indent=1))


if __name__ == "__main__":
    main()
