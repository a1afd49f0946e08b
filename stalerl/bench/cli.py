"""`stalerl bench`'s command line: options to a Plan, a clear error before any work, the table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from stalerl.bench.plan import CHECKPOINT_PARTS, WARMUP_STEPS, default_plan
from stalerl.bench.suite import PARTS, run_bench
from stalerl.bench.table import format_table


def add_bench_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="speed and memory side by side with TRL and plain transformers")
    parser.add_argument("--out", required=True, help="directory for bench.json")
    parser.add_argument("--quick", action="store_true", help="a smoke version: tiny step counts, one repeat (about a minute on 2 cores)")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} "
                        f"(default: all; with --model: {','.join(CHECKPOINT_PARTS)})")
    parser.add_argument("--model", default=None, help="time gen and async on this Hugging Face checkpoint directory, "
                        "or random:llama-3.2-1b (that shape, random weights), on a GPU where there is one")
    parser.add_argument("--data", default=None, help="with --model: the math task's JSONL or Parquet file")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every timed comparison, medians "
                        "reported (default: 3 for the full suite, 1 for --quick or --model)")
    parser.add_argument("--async-steps", type=int, default=None, help="steps of each async run, the first "
                        f"{WARMUP_STEPS} untimed (default: 50; 8 with --quick or --model, 5 with both)")
    parser.add_argument("--async-staleness", default=None, metavar="S,S,...", help="the staleness of the async "
                        "rows besides S = 0 (default: 1,2,4; 1,2 with --model, 1 with --model and --quick)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field for the gen and async runs, e.g. --set rollout.max_new_tokens=256 "
                        "(repeatable; step, sweep and memory keep their fixed settings)")


def parse_async_staleness(text: str) -> tuple[int, ...]:
    """--async-staleness: comma-separated S >= 1, run in increasing order; empty: the plan's own."""
    from stalerl.config import ConfigError

    values = [part.strip() for part in text.split(",") if part.strip()]
    if not all(value.isdecimal() and int(value) >= 1 for value in values):  # isdecimal: what int() reads
        raise ConfigError(f"--async-staleness: comma-separated whole numbers >= 1 (S = 0 always runs), got {text!r}")
    return tuple(sorted({int(value) for value in values}))


def run_bench_command(args: Any) -> int:
    from stalerl.config import ConfigError, parse_assignment

    parts = tuple(part.strip() for part in (args.parts or "").split(",") if part.strip())
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise ConfigError(f"--parts: unknown {unknown[0]!r} (known: {', '.join(PARTS)})")
    if args.repeats is not None and args.repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1 (got {args.repeats})")
    if args.async_steps is not None and args.async_steps < WARMUP_STEPS + 2:
        raise ConfigError(f"--async-steps: must be >= {WARMUP_STEPS + 2}, the first {WARMUP_STEPS} are not timed "
                          f"(got {args.async_steps})")
    staleness = parse_async_staleness(args.async_staleness or "")
    settings = dict(parse_assignment(text) for text in args.set)
    plan = default_plan(args.quick, bool(args.model))
    if args.repeats is not None:  # on a noisy machine, more repeats tighten the medians
        plan = dataclasses.replace(plan, repeats=args.repeats)
    if args.async_steps is not None:  # a rollout-bound run reaches its steady rate only after its queue drains
        plan = dataclasses.replace(plan, async_steps=args.async_steps)
    if staleness:  # a device session's minutes go to the rows that matter
        plan = dataclasses.replace(plan, async_staleness=staleness)
    report = run_bench(Path(args.out), args.quick, plan=plan,
                       parts=parts or (CHECKPOINT_PARTS if args.model else PARTS),
                       log=lambda text: print(text, flush=True), checkpoint=args.model or "", data=args.data or "",
                       settings=settings)
    print(format_table(report))
    print(f"report: {Path(args.out) / 'bench.json'}")
    return 0
