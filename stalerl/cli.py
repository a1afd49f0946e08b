"""Command line: ``stalerl train`` (the lab's commands join it as subcommands)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import signal
import sys
import threading
import time
from pathlib import Path

from stalerl.bench.cli import add_bench_parser, run_bench_command
from stalerl.config import ConfigError, TrainConfig, load_config, override, parse_assignment, validate
from stalerl.guards import Terminated
from stalerl.provenance import version_line


def build_train_config(args: argparse.Namespace) -> TrainConfig:
    """File (or defaults; with --resume the run's config.yaml), then --set assignments, then the named
    flags; validated at the end. On --resume, train() refuses a result that differs from the run's."""
    if args.resume and args.out:
        raise ConfigError("--resume RUN goes on in RUN: leave out --out")
    config = load_config(args.config) if args.config else _saved_config(args.resume) if args.resume else TrainConfig()
    overrides = dict(parse_assignment(text) for text in args.set)
    flags = {
        "staleness.staleness": args.staleness,
        "staleness.mode": args.mode,
        "optim.lr": args.lr,
        "steps": args.steps,
        "seed": args.seed,
        "out": args.out,
        "val_every": args.val_every,
        "threads": args.threads,
        "model.name_or_path": args.model,
        "task.name": args.task,
        "task.data": args.data,
        "task.reward": args.reward,
        "runtime.runtime": args.runtime,
        "runtime.local_worker": args.local_worker,
        "runtime.num_workers": args.num_workers,
        "runtime.ray_address": args.ray_address,
        "wandb.project": args.wandb,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if args.no_progress:
        overrides["progress"] = False
    if args.resume:
        overrides["out"] = args.resume
    config = override(config, overrides)
    for flag, value, why in (("--num-workers", args.num_workers, "the local runtime has one rollout worker"),
                             ("--ray-address", args.ray_address, "a local run starts no Ray")):
        if value is not None and config.runtime.runtime != "ray":
            raise ConfigError(f"{flag}: is for --runtime ray ({why})")
    return validate(config)


def fresh_run_dir(name: str) -> str:
    """`name`, or `name-2`, `name-3`..: a directory made here, so that two runs started in the same
    second do not share one (each would take the other's for its own until the first step is written)."""
    number = 1
    while True:
        candidate = name if number == 1 else f"{name}-{number}"
        try:
            Path(candidate).mkdir(parents=True)
        except FileExistsError:
            number += 1
            continue
        except OSError:  # unwritable: train() names the problem in one line
            pass
        return candidate


def _saved_config(run_dir: str) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    return load_config(path)


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
    parser.add_argument("--model", help="Hugging Face checkpoint directory (or hub name); default: the embedded "
                        "tiny model")
    parser.add_argument("--task", choices=["addition", "math"], help="addition (default) or math: GSM8K/MATH-style "
                        "records checked by math-verify")
    parser.add_argument("--data", help="math: the records (question, answer): a .jsonl (.gz) or .parquet file, a "
                        "`datasets` save_to_disk directory, or a Hugging Face dataset name (its local cache)")
    parser.add_argument("--reward", help="MODULE:FUNCTION or FILE.py:FUNCTION, (prompt, completion, **record) -> float")
    parser.add_argument("--runtime", choices=["local", "ray"], help="local: a rollout thread; ray: rollout actors "
                        "and a learner actor (README, 'Ray runtime')")
    parser.add_argument("--local-worker", choices=["thread", "process"],
                        help="local: the rollout worker in a thread (default) or a process of its own: no shared "
                             "GIL, for long runs with S >= 1 (a few seconds to start)")
    parser.add_argument("--num-workers", type=int, help="ray: rollout-worker actors")
    parser.add_argument("--ray-address", help="ray: join this cluster; default: a private Ray on 127.0.0.1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field by dotted name, e.g. --set loss.eps_high=0.28 (repeatable); "
                             "text fields (task.prompt_template, ...) take the value as typed")
    parser.add_argument("--wandb", metavar="PROJECT", help="log to Weights & Biases too (pip install "
                        "'stalerl[wandb]'; --set wandb.mode=offline: no network)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.add_argument("--resume", metavar="RUN", help="go on with the unfinished run in RUN from its newest valid "
                        "checkpoint, with its config.yaml (other options must agree with it)")


def run_train(args: argparse.Namespace) -> int:
    config = build_train_config(args)
    if config.out:
        return train_and_report(config, resume=bool(args.resume))
    config = override(config, {"out": fresh_run_dir(time.strftime("runs/train-%Y%m%d-%H%M%S"))})
    try:
        return train_and_report(config, resume=False)
    except ConfigError:  # refused before its first step: train() left the directory as made here, empty
        with contextlib.suppress(OSError):
            Path(config.out).rmdir()
        raise


def train_and_report(config: TrainConfig, resume: bool) -> int:
    if config.runtime.runtime == "local" and config.runtime.local_worker == "process":
        from stalerl import forking

        forking.context()  # on CPU the worker's imports start now, in the fork server, beside ours
    from stalerl.train import train  # torch and transformers load only once the config is good

    if config.runtime.runtime == "ray":
        from stalerl.ray_runtime import train_on_ray

        summary = train_on_ray(config, resume=resume)
    else:
        summary = train(config, resume=resume)
    collapse = summary["collapse_step"]
    print(
        f"run {config.out}: {summary['steps']} steps in {summary['wall_s']:.0f} s; "
        f"val reward {summary['initial_val_reward']:.3f} -> {summary['final_val_reward']:.3f} "
        f"(best {summary['best_val_reward']:.3f}); "
        + (f"collapsed at step {collapse}" if collapse is not None else "no collapse")
    )
    return 0


def _list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sweep", help="grid over staleness x learning rate (x seeds x stabilizers)")
    parser.add_argument("--staleness", "-S", type=_list(int), required=True, help="e.g. 0,4,16")
    parser.add_argument("--lr", type=_list(float), required=True, help="e.g. 1e-4,3e-4,1e-3")
    parser.add_argument("--seeds", type=_list(int), default=[0], help="e.g. 0,1,2")
    parser.add_argument("--stabilizers", type=_list(str), default=["none"],
                        help="none,staleness,ess,gac (each a column of cells)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--mode", choices=["exact", "bounded"])
    parser.add_argument("--out", required=True, help="sweep directory (rerun the command to resume)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (processes, 1 torch thread each)")
    parser.add_argument("--runtime", choices=["local", "ray"], default="local",
                        help="ray: every cell a Ray actor (a private Ray on 127.0.0.1, or --ray-address)")
    parser.add_argument("--ray-address", help="join this Ray cluster (e.g. auto) instead of starting one")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each cell's Ray actor asks for")
    parser.add_argument("--config", help="base config YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--wandb", metavar="PROJECT", help="log each cell to Weights & Biases, grouped by the "
                        "sweep's name (--set wandb.mode=offline: no network)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures at the end")


def run_sweep_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stalerl.lab.sweep import cell_configs, run_sweep, worker_context

    if args.ray_address is not None and args.runtime != "ray":
        raise ConfigError("--ray-address: is for --runtime ray (a local sweep starts no Ray)")
    base = load_config(args.config) if args.config else TrainConfig()
    overrides = dict(parse_assignment(text) for text in args.set)
    flags = {"steps": args.steps, "staleness.mode": args.mode, "wandb.project": args.wandb}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    overrides.update({"threads": 1, "tensorboard": False})
    base = override(base, overrides)
    if base.val_in_background is None:  # the workers keep the cores busy: a validation thread would add CPU time
        base = override(base, {"val_in_background": False})
    if args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    out = Path(args.out)
    cells = cell_configs(base, out, args.staleness, args.lr, args.seeds, args.stabilizers)
    if args.cpus_per_run <= 0:
        raise ConfigError("--cpus-per-run must be > 0")
    if args.runtime == "local":
        worker_context([config for _, config in cells])  # on CPU the workers' imports start now, beside ours
    table = run_sweep(cells, out, args.workers, progress=not args.no_progress, runtime=args.runtime,
                      ray_address=args.ray_address, cpus_per_run=args.cpus_per_run)
    collapsed = sum(row["collapse_step"] is not None for row in table)
    print(f"sweep {out}: {len(table)} runs, {collapsed} collapsed; table in {out / 'sweep.json'}")
    figures = []
    if not args.no_figures:
        from stalerl.lab.plots import sweep_figures

        figures = sweep_figures(out)
        for path in figures:
            print(f"figure: {path}")
    if base.wandb.project:
        from stalerl.wandb_logging import log_sweep

        log_sweep(base, out, table, figures)
    return 0


def add_lab_parsers(subparsers: argparse._SubParsersAction) -> None:
    advise = subparsers.add_parser("advise", help="learning-rate advice from a run, sweep or probe directory")
    advise.add_argument("directory", help="a run directory, or a directory of runs (a sweep or a probe)")
    advise.add_argument("--staleness", "-S", type=_list(int), help="S values to advise for (default: those seen)")
    advise.add_argument("--steps", type=int, help="horizon T (default: the runs' length)")
    advise.add_argument("--clip-threshold", type=float, default=0.05,
                        help="clip fraction for the clip-onset diagnostic (clip_onset_drift in --json); R_batch "
                             "itself comes from collapsed runs")
    advise.add_argument("--json", help="also write the report here")

    plot = subparsers.add_parser("plot", help="figures in the paper's layout for a sweep directory")
    plot.add_argument("directory", help="a sweep directory; the figures are written into it")
    plot.add_argument("more", nargs="*", metavar="MORE",
                      help="more directories whose runs join the figures (e.g. stabilizer sweeps at other settings)")

    bias = subparsers.add_parser("bias", help="surrogate-gradient bias probe ||b_t(S)|| vs S and eta, on the "
                                 "config's model (on model.device) and task")
    bias.add_argument("--lr", type=_list(float), default=[1e-4, 3e-4, 1e-3])
    bias.add_argument("--anchors", type=_list(int), default=[32], help="anchor steps t")
    bias.add_argument("--lags", type=_list(int), default=[0, 1, 2, 4, 8, 16])
    bias.add_argument("--batches", type=int, default=24, help="paired batches per estimate (M)")
    bias.add_argument("--config", help="base config YAML")
    bias.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bias.add_argument("--out", required=True)
    bias.add_argument("--refit", action="store_true", help="only redo the fits and figure of OUT/bias.json")


def run_advise(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stalerl.lab.advice import advise_directory, print_report, write_report

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: the horizon T must be >= 1, got {args.steps}")
    if args.staleness and min(args.staleness) < 0:
        raise ConfigError(f"--staleness: S must be >= 0, got {min(args.staleness)}")
    if not 0 < args.clip_threshold < 1:  # NaN too
        raise ConfigError(f"--clip-threshold: a clip fraction in (0, 1), got {args.clip_threshold}")
    if args.json:  # checked before the report is printed
        from stalerl.guards import output_directory

        if Path(args.json).is_dir():
            raise ConfigError(f"--json {args.json}: is a directory; name the report's file")
        output_directory(Path(args.json).parent, "--json")
    try:
        report = advise_directory(Path(args.directory), args.staleness, args.steps, args.clip_threshold)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    print_report(report)
    if args.json:
        write_report(report, Path(args.json))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stalerl.lab.plots import sweep_figures

    try:
        paths = sweep_figures(Path(args.directory), tuple(Path(path) for path in args.more))
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    for path in paths:
        print(f"figure: {path}")
    return 0


def run_bias(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stalerl.lab.bias import refit, run_probe

    if args.refit:
        if not (Path(args.out) / "bias.json").is_file():
            raise ConfigError(f"--refit: no bias.json in {args.out}")
        report = refit(Path(args.out))
        _print_bias_fits(report)
        return 0
    base = load_config(args.config) if args.config else TrainConfig()
    base = validate(override(base, dict(parse_assignment(text) for text in args.set)))
    for flag, values in (("--lr", args.lr), ("--anchors", args.anchors), ("--lags", args.lags)):
        if not values:
            raise ConfigError(f"{flag}: no values given")
    if not all(0 < lr < math.inf for lr in args.lr):  # NaN too
        raise ConfigError("--lr: learning rates must be > 0 and finite")
    if min(args.lags) < 0:
        raise ConfigError(f"--lags: must be >= 0, got {min(args.lags)}")
    if min(args.anchors) < 1:
        raise ConfigError(f"--anchors: anchor steps must be >= 1 (the bias is measured after t updates), "
                          f"got {min(args.anchors)}")
    if min(args.anchors) < max(args.lags):
        raise ConfigError(f"--anchors: every anchor must be >= the largest lag ({max(args.lags)})")
    if args.batches < 3:
        raise ConfigError("--batches must be >= 3 (the jackknife needs them)")
    report = run_probe(base, args.lr, args.anchors, args.lags, args.batches, Path(args.out))
    _print_bias_fits(report)
    print(f"report: {Path(args.out) / 'bias.json'}, figure: {Path(args.out) / 'bias.png'}")
    return 0


def _print_bias_fits(report: dict) -> None:
    def text(fit: dict | None) -> str:
        if fit is None:
            return "not determined by its points"
        chi2 = fit.get("chi2_per_dof")  # the weighted fit's; the log-log fit has none
        misfit = f", chi2/dof {chi2:.1f}" if chi2 is not None and math.isfinite(chi2) else ""
        return f"{fit['slope']:.2f} [{fit['slope_low']:.2f}, {fit['slope_high']:.2f}] ({fit['points']} points{misfit})"

    weighted, log_log = report["fits"], report["fits_log_log"]

    def both(fit: dict | None, other: dict | None) -> str:
        return f"{text(fit)}; log-log above the floor {text(other)}"

    for lr, fit in weighted["by_lr"].items():
        ends = ", ".join(f"S={end} at t={anchor}" for anchor, end in fit["linear_regime_end"].items())
        print(f"lr={lr}: S exponent {both(fit['s_exponent'], log_log['by_lr'][lr]['s_exponent'])}; "
              f"linear regime up to {ends}")
    for lag, fit in weighted["eta_exponent_by_lag"].items():
        print(f"S={lag}: eta exponent {both(fit, log_log['eta_exponent_by_lag'][lag])}")
    for key, what in (("s_eta_exponent_pooled", "S*eta"), ("drift_exponent_pooled", "within-cycle drift")):
        print(f"pooled, inside the linear regimes: {what} exponent {both(weighted[key], log_log[key])}")


# A negative number in scientific notation or a list that starts with one, which argparse takes for
# an option's name ("--lr -1e-3", "-S -1,0").
NEGATIVE_VALUE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,.*)?$")


def glue_negative_values(argv: list[str]) -> list[str]:
    """'--lr -1e-3' -> '--lr=-1e-3', so that the value reaches its check ("optim.lr: must be > 0")."""
    glued: list[str] = []
    for token in argv:
        if NEGATIVE_VALUE.match(token) and glued and glued[-1].startswith("-") and "=" not in glued[-1]:
            glued[-1] = f"{glued[-1]}={token}"
        else:
            glued.append(token)
    return glued


def refuse_empty_values(args: argparse.Namespace) -> None:
    """`--resume "$RUN"` with RUN unset would otherwise start a fresh default run (and `--config ''`,
    `--model ''` run the defaults): no option takes an empty text."""
    for name, value in vars(args).items():
        if value == "" or (isinstance(value, list) and "" in value):
            raise ConfigError(f"--{name.replace('_', '-')}: empty value (an unset shell variable?)")


class OneLineErrors(argparse.ArgumentParser):
    """argparse's own errors (`--steps abc`, an unknown option) in one line, as stalerl's other errors;
    `--help` still shows the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"stalerl: error: {message} (see {self.prog} --help)\n")


class PrintVersion(argparse.Action):
    """`--version` as one line (argparse's own action wraps it at the terminal's width)."""

    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_line())  # to stdout, as argparse's own --version
        parser.exit(0)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called in process (the tests) leaves it as it was


def _main(argv: list[str] | None) -> int:
    parser = OneLineErrors(prog="stalerl", description="Asynchronous GRPO with exact or bounded staleness, and "
                           "the lab that turns staleness into learning-rate advice.")
    parser.add_argument("--version", action=PrintVersion, help="stalerl's version and its libraries'")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_sweep_parser(subparsers)
    add_lab_parsers(subparsers)
    add_bench_parser(subparsers)
    args = parser.parse_args(glue_negative_values(sys.argv[1:] if argv is None else argv))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        refuse_empty_values(args)
        commands = {"train": run_train, "sweep": run_sweep_command, "advise": run_advise, "plot": run_plot,
                    "bias": run_bias, "bench": run_bench_command}
        return commands[args.command](args)
    except ConfigError as error:
        print(f"stalerl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # before a run took over the signals, or a second Ctrl-C: what is written stays
        what = "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted"
        print(f"stalerl: {what}; what is written stays", file=sys.stderr)
        return 130
    except RuntimeError as error:  # a reward that failed under task.on_reward_error=stop, a dead learner: one line
        from stalerl.guards import RunStopped
        from stalerl.ray_runtime import LearnerFailed  # light: Ray itself is not imported
        from stalerl.rewards import RewardError

        if isinstance(error, RunStopped):  # non-finite updates, Ctrl-C/SIGTERM, a full disk
            print(f"stalerl: {error}", file=sys.stderr)
            return error.exit_code
        reward_error = error if isinstance(error, RewardError) else error.__cause__
        if isinstance(reward_error, RewardError):
            print(f"stalerl: error: {reward_error} (finished steps are kept in the run directory)", file=sys.stderr)
            return 3
        if isinstance(error, LearnerFailed):  # Ray: the message names the newest checkpoint and --resume
            print(f"stalerl: error: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
