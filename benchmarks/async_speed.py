"""Steps per second at S = 0 (synchronous) and S = 2 (exact lag), same config, side by side.

    python benchmarks/async_speed.py --steps 60 --repeats 3 [--threads 1 2]

Runs alternate (S=0, S=2, S=0, ...) so machine noise hits both; reports medians, the ratio, and
the ideal overlap bound (t_gen + t_train) / max(t_gen, t_train) from the S = 0 runs' own timings.
Writes nothing but run directories under a temporary folder; prints a table (and --json FILE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from stalerl.config import StalenessConfig, TrainConfig
from stalerl.metrics import read_metrics
from stalerl.train import train


def one_run(staleness: int, steps: int, threads: int, out: Path) -> dict:
    config = TrainConfig(steps=steps, val_every=10**6, progress=False, tensorboard=False, threads=threads,
                         out=str(out), staleness=StalenessConfig(mode="exact", staleness=staleness))
    summary = train(config)
    rows = read_metrics(out)[5:]  # the first steps include warm-up effects (allocator, caches)
    loop_s = sum(r["wait_s"] + r["train_s"] for r in rows)
    return {
        "steps_per_s": len(rows) / loop_s,
        # the rollout side's whole time per batch (sampling, reward, weight load), as stalerl bench takes it
        "gen_s": statistics.median(r["gen_s"] + r["reward_s"] + r["weight_sync_s"] for r in rows),
        "train_s": statistics.median(r["train_s"] for r in rows),
        "wall_s": summary["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--staleness", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            results: dict[int, list[dict]] = {0: [], args.staleness: []}
            for repeat in range(args.repeats):
                for staleness in results:
                    out = Path(tmp) / f"t{threads}-s{staleness}-r{repeat}"
                    results[staleness].append(one_run(staleness, args.steps, threads, out))
            sync, lagged = results[0], results[args.staleness]
            sync_rate = statistics.median(r["steps_per_s"] for r in sync)
            lagged_rate = statistics.median(r["steps_per_s"] for r in lagged)
            gen, learn = statistics.median(r["gen_s"] for r in sync), statistics.median(r["train_s"] for r in sync)
            ideal = (gen + learn) / max(gen, learn)
            ratio = lagged_rate / sync_rate
            report.append({
                "threads": threads, "S": args.staleness, "steps_per_s_S0": sync_rate,
                f"steps_per_s_S{args.staleness}": lagged_rate, "ratio": ratio, "ideal_overlap": ideal,
                "fraction_of_ideal_gain": (ratio - 1) / (ideal - 1) if ideal > 1 else None,
                "gen_s_S0": gen, "train_s_S0": learn, "repeats": args.repeats, "steps": args.steps,
            })
    print(f"{'threads':>7} {'S=0 steps/s':>12} {f'S={args.staleness} steps/s':>12} {'ratio':>6} "
          f"{'ideal':>6} {'gen_s':>7} {'train_s':>7}")
    for row in report:
        print(f"{row['threads']:>7} {row['steps_per_s_S0']:>12.2f} {row[f'steps_per_s_S{args.staleness}']:>12.2f} "
              f"{row['ratio']:>6.2f} {row['ideal_overlap']:>6.2f} {row['gen_s_S0']:>7.3f} {row['train_s_S0']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
