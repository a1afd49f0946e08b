"""Samples/s of the same config on the local runtime and on Ray with 1, 2 and 4 rollout workers.

    python benchmarks/ray_throughput.py --steps 60 --repeats 3 --staleness 4

Every runtime runs the same exact-lag config; a synchronous local run (S = 0) gives the ideal
overlap bound (t_gen + t_train) / max(t_gen, t_train) from its own timings. Runs alternate
(sync, local, ray x1, ray x2, ray x4, sync, ...) so machine noise hits all; medians are reported:
samples/s over the loop (after warm-up steps), the learner's idle fraction wait_s / loop time,
the speedup over the synchronous run and that speedup's share of the ideal gain.
One private Ray (127.0.0.1) serves all Ray runs; actors ask for --worker-cpus each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from stalerl.config import RuntimeConfig, StalenessConfig, TrainConfig
from stalerl.metrics import read_metrics
from stalerl.ray_runtime import ray_session, train_on_ray
from stalerl.train import train

WARMUP_STEPS = 5  # allocator and cache warm-up; actors' first batches include their start


def one_run(config: TrainConfig) -> dict:
    summary = train_on_ray(config) if config.runtime.runtime == "ray" else train(config)
    rows = read_metrics(Path(config.out))[WARMUP_STEPS:]
    loop_s = sum(r["wait_s"] + r["train_s"] for r in rows)
    samples = len(rows) * config.rollout.prompts_per_step * config.rollout.group_size
    return {
        "samples_per_s": samples / loop_s,
        "idle_fraction": sum(r["wait_s"] for r in rows) / loop_s,
        # the rollout side's whole time per batch (sampling, reward, weight load), as stalerl bench takes it
        "gen_s": statistics.median(r["gen_s"] + r["reward_s"] + r["weight_sync_s"] for r in rows),
        "train_s": statistics.median(r["train_s"] for r in rows),
        "lost_batches": summary["rollouts"]["lost_batches"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--staleness", type=int, default=4, help="S of the async runs (exact lag)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--worker-cpus", type=float, default=0.5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    base = TrainConfig(steps=args.steps, val_every=10**6, progress=False, tensorboard=False, threads=1)
    variants = {"sync S=0": dataclasses.replace(base, staleness=StalenessConfig("exact", 0)),
                f"local S={args.staleness}": dataclasses.replace(base, staleness=StalenessConfig("exact", args.staleness))}
    for workers in args.workers:
        variants[f"ray x{workers} S={args.staleness}"] = dataclasses.replace(
            variants[f"local S={args.staleness}"],
            runtime=RuntimeConfig("ray", num_workers=workers, worker_cpus=args.worker_cpus, learner_cpus=0.5))
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=0.5 + max(args.workers) * args.worker_cpus):
        for repeat in range(args.repeats):
            for index, (name, config) in enumerate(variants.items()):
                out = str(Path(tmp) / f"{index}-r{repeat}")
                results[name].append(one_run(dataclasses.replace(config, out=out)))

    sync = results["sync S=0"]
    t_gen, t_train = statistics.median(r["gen_s"] for r in sync), statistics.median(r["train_s"] for r in sync)
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    sync_rate = statistics.median(r["samples_per_s"] for r in sync)
    report = []
    for name, runs in results.items():
        rate = statistics.median(r["samples_per_s"] for r in runs)
        speedup = rate / sync_rate
        report.append({"runtime": name, "samples_per_s": rate,
                       "idle_fraction": statistics.median(r["idle_fraction"] for r in runs),
                       "speedup_vs_sync": speedup, "share_of_ideal_gain": (speedup - 1) / (ideal - 1) if ideal > 1 else None,
                       "lost_batches": sum(r["lost_batches"] for r in runs)})
    print(f"sync S=0 timings: t_gen {t_gen:.3f} s, t_train {t_train:.3f} s -> ideal overlap bound {ideal:.2f}x "
          f"({args.steps} steps, {args.repeats} repeats, medians)")
    print(f"{'runtime':>16} {'samples/s':>10} {'idle':>6} {'speedup':>8} {'of ideal gain':>14}")
    for row in report:
        share = "-" if row["share_of_ideal_gain"] is None else f"{row['share_of_ideal_gain']:.0%}"
        print(f"{row['runtime']:>16} {row['samples_per_s']:>10.1f} {row['idle_fraction']:>6.2f} "
              f"{row['speedup_vs_sync']:>7.2f}x {share:>14}")
    if args.json:
        args.json.write_text(json.dumps({"ideal_overlap": ideal, "t_gen": t_gen, "t_train": t_train,
                                         "rows": report}, indent=2))


if __name__ == "__main__":
    main()
