"""Command line: ``stalerl train`` (the lab's commands join it as subcommands)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import yaml

from stalerl.config import ConfigError, TrainConfig, load_config, override, validate


def _parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def build_train_config(args: argparse.Namespace) -> TrainConfig:
    """File (or defaults), then --set assignments, then the named flags; validated at the end."""
    config = load_config(args.config) if args.config else TrainConfig()
    overrides = dict(_parse_assignment(text) for text in args.set)
    flags = {
        "staleness.staleness": args.staleness,
        "staleness.mode": args.mode,
        "optim.lr": args.lr,
        "steps": args.steps,
        "seed": args.seed,
        "out": args.out,
        "val_every": args.val_every,
        "threads": args.threads,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if args.no_progress:
        overrides["progress"] = False
    config = override(config, overrides)
    if not config.out:
        config = override(config, {"out": time.strftime("runs/train-%Y%m%d-%H%M%S")})
    return validate(config)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="run async GRPO (no arguments: the embedded tiny default)")
    parser.add_argument("--config", help="YAML file with any TrainConfig fields (see configs/tiny.yaml)")
    parser.add_argument("--staleness", "-S", type=int, help="S: maximum (bounded) or exact rollout lag in steps")
    parser.add_argument("--mode", choices=["exact", "bounded"], help="exact: step t trains on theta_{t-S}; "
                        "bounded: every sample's lag is in [0, S]")
    parser.add_argument("--lr", type=float, help="learning rate eta")
    parser.add_argument("--steps", type=int, help="learner steps T")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="run directory (must not hold a run already)")
    parser.add_argument("--val-every", type=int, help="validate on the held-out split every N steps")
    parser.add_argument("--threads", type=int, help="torch threads for this process (0: torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field by dotted name, e.g. --set loss.eps_high=0.28 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


def run_train(args: argparse.Namespace) -> int:
    from stalerl.train import train  # torch and transformers load only once the config is good

    config = build_train_config(args)
    summary = train(config)
    collapse = summary["collapse_step"]
    print(
        f"run {config.out}: {summary['steps']} steps in {summary['wall_s']:.0f} s; "
        f"val reward {summary['initial_val_reward']:.3f} -> {summary['final_val_reward']:.3f} "
        f"(best {summary['best_val_reward']:.3f}); "
        + (f"collapsed at step {collapse}" if collapse is not None else "no collapse")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stalerl", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return {"train": run_train}[args.command](args)
    except ConfigError as error:
        print(f"stalerl: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
