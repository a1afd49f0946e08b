"""Weights & Biases logging, when `wandb.project` names a project (extra `stalerl[wandb]`).

W&B mirrors the run: each step's numeric metrics (the keys of metrics.jsonl, at W&B step = learner
step), the resolved config, and summary.json's figures at the end (T_c, validation rewards, wall and
CPU time). metrics.jsonl, samples.jsonl and summary.json stay the run's record, and TensorBoard is
written as before.

* The W&B run starts before the model loads, so a login or network problem stops `stalerl train`
  before any work; `wandb.mode=offline` logs into RUN/wandb/ with no network (`wandb sync` later).
* `--resume` goes on in the same W&B run: its id is kept in RUN/wandb-run-id. W&B keeps the first
  value it was sent for a step, so the steps that the stopped run logged after its checkpoint keep
  those values (in exact mode the same ones, timings aside) and are not sent again.
* A W&B failure during the run (its service killed, the network gone) prints one warning and ends
  the W&B logging; the run itself goes on.
* A sweep's cells are W&B runs named after their directories, grouped by the sweep's directory;
  the sweep itself is one more run in that group, with sweep.json as a table and the lab's figures.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stalerl.config import ConfigError, first_line
from stalerl.guards import Interrupted

if TYPE_CHECKING:
    from stalerl.config import TrainConfig

RUN_ID_FILE = "wandb-run-id"  # in the run directory: --resume continues this W&B run


class WandbStartError(ConfigError):
    """wandb.init failed (not logged in, no network, a wrong entity): one line, before any work."""


class WandbRun:
    """One W&B run beside a stalerl run; `log` and `finish` never raise (module doc)."""

    def __init__(self, run: Any, first_step: int):
        self.run = run
        self.first_step = first_step  # on a resume, W&B already has the steps before this one

    @classmethod
    def start(cls, config: TrainConfig, run_dir: Path, resume: bool, job_type: str = "train") -> WandbRun | None:
        """The W&B run for `config`, or None when `wandb.project` is empty."""
        options = config.wandb
        if not options.project:
            return None
        import wandb  # only when asked for: the extra is optional

        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        try:
            run = wandb.init(
                project=options.project, entity=options.entity or None, group=options.group or None,
                name=options.name or run_dir.name, job_type=job_type, dir=str(run_dir), mode=options.mode,
                config=config.to_dict(), id=run_id, resume="allow" if run_id else None,
                # stalerl's own output is its progress bar: W&B's copy of it would be noise. Without the
                # bar (a sweep's cells, scripts) W&B prints nothing either.
                settings=wandb.Settings(console="off", silent=not config.progress),
            )
        except Exception as error:  # wandb raises its own errors (UsageError, CommError) and plain ones
            raise WandbStartError(f"wandb.project: W&B could not start a run in {options.project!r} "
                                  f"({first_line(error)}); --set wandb.mode=offline logs with no server") from None
        id_file.write_text(run.id + "\n")
        return cls(run, first_step=run.step if run_id else 0)

    def log(self, metrics: dict[str, Any]) -> None:
        """The step's numeric metrics at W&B step metrics['step']; None (no value this step) left out."""
        if self.run is None or metrics["step"] < self.first_step:
            return
        self._send({key: value for key, value in metrics.items() if key != "step" and isinstance(value, (int, float))},
                   step=metrics["step"])

    def log_sweep(self, table: list[dict[str, Any]], figures: list[Path]) -> None:
        """sweep.json as a W&B table, and the lab's figures as images."""
        import wandb

        columns = list(dict.fromkeys(key for row in table for key in row))
        values = {"sweep": wandb.Table(columns=columns, data=[[row.get(key) for key in columns] for row in table])}
        values |= {f"figures/{path.stem}": wandb.Image(str(path)) for path in figures}
        self._send(values)

    def _send(self, values: dict[str, Any], step: int | None = None) -> None:
        try:
            self.run.log(values, step=step)
        except Exception as error:
            self._give_up(error)

    def finish(self, summary: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
        """Ends the W&B run: with the run's summary, or marked failed with the error's first line."""
        if self.run is None:
            return
        try:
            if summary is not None:
                self.run.summary.update(summary)
            if error is not None:
                self.run.summary["stopped_by"] = first_line(error)
            interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
            self.run.finish(exit_code=0 if error is None else 130 if interrupted else 1)
        except Exception as failure:
            self._give_up(failure)
        self.run = None

    def _give_up(self, error: Exception) -> None:
        print(f"stalerl: W&B logging stopped ({first_line(error)}); metrics.jsonl and TensorBoard go on",
              file=sys.stderr)
        import wandb

        for end in (lambda: self.run.finish(exit_code=1), wandb.teardown):  # teardown: no traceback at exit
            try:
                end()
            except Exception:
                pass  # the service is gone: nothing more to tell it
        self.run = None


def log_sweep(base: TrainConfig, out: Path, table: list[dict[str, Any]], figures: list[Path]) -> None:
    """The sweep as a whole, a W&B run of its own in its cells' group (`stalerl sweep --wandb`):
    sweep.json as a table and the figures. Rerunning the sweep adds to the same run (its id is in
    OUT/wandb-run-id). The sweep's files are written first: a W&B failure here is only a warning."""
    config = replace(base, out=str(out), wandb=replace(base.wandb, group=sweep_group(base, out)))
    try:
        wandb_run = WandbRun.start(config, out, resume=True, job_type="sweep")
    except WandbStartError as error:
        print(f"stalerl: {error}; the sweep's own files are written", file=sys.stderr)
        return
    if wandb_run is not None:
        wandb_run.log_sweep(table, figures)
        wandb_run.finish({"cells": len(table), "collapsed": sum(row["collapse_step"] is not None for row in table)})


def sweep_group(base: TrainConfig, out: Path) -> str:
    """The W&B group of a sweep's runs: wandb.group, else the sweep directory's name."""
    return base.wandb.group or out.name
