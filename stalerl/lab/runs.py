"""Reading run directories into records the lab's fits and figures use.

The collapse fields of summary.json (collapse_step, collapse_version and what follows from them)
are recomputed from metrics.jsonl with the run's own collapse settings and the current definition
(collapse.py), so a run written before that definition changed is read the way a new one is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from stalerl.collapse import collapse_summary
from stalerl.config import CollapseConfig
from stalerl.metrics import read_metrics


@dataclass
class RunRecord:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def staleness(self) -> int:
        return self.config["staleness"]["staleness"]

    @property
    def lr(self) -> float:
        return self.config["optim"]["lr"]

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def stabilizer(self) -> str:
        return stabilizer_name(self.config)

    @property
    def collapse_step(self) -> int | None:
        return self.summary["collapse_step"]

    @property
    def collapse_version(self) -> int | None:
        """The policy version that collapsed (the collapse step minus the lag of its batch)."""
        return self.summary.get("collapse_version", self.collapse_step)

    @property
    def too_short_to_judge(self) -> bool:
        """Fewer steps than collapse.min_tail: no collapse could be confirmed, so neither stable nor collapsed."""
        min_tail = self.config.get("collapse", {}).get("min_tail", CollapseConfig.min_tail)
        return self.collapse_version is None and len(self.metrics) < min_tail

    def series(self, key: str) -> list[Any]:
        return [row.get(key) for row in self.metrics]


def horizon_version(run: RunRecord) -> int:
    """The newest policy version whose reward a run saw: where a run that did not collapse is censored
    (collapse.png draws it, and law.collapse_table's censored fit uses it)."""
    return run.metrics[-1]["version"] if run.metrics and "version" in run.metrics[-1] \
        else max(run.summary["steps"] - 1 - run.staleness, 0)


def censoring_version(run: RunRecord) -> int:
    """The version past which a run that did not collapse may still have collapsed: a collapse is
    confirmed only once it has lasted collapse.min_tail steps, so one that began in the run's last
    min_tail - 1 steps would not show. The run rules out the versions up to this one."""
    min_tail = run.config.get("collapse", {}).get("min_tail", CollapseConfig.min_tail)
    return max(horizon_version(run) - (min_tail - 1), 0)


def stabilizer_name(config: dict[str, Any]) -> str:
    stabilizer = config.get("stabilizer", {})
    names = [stabilizer["lr_control"]] if stabilizer.get("lr_control", "none") != "none" else []
    if stabilizer.get("gac_cos_threshold", 0) > 0:
        names.append("gac")
    return "+".join(names) or "none"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def recomputed_summary(config: dict[str, Any], summary: dict[str, Any],
                       metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json with its collapse fields recomputed from the metrics rows (collapse.collapse_summary)."""
    if not metrics:
        return summary
    settings = {**asdict(CollapseConfig()), **config.get("collapse", {})}
    return {**summary, **collapse_summary(metrics, settings["window"], settings["threshold"], settings["min_tail"])}


def load_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return RunRecord(path=run_dir, config=config, summary=recomputed_summary(config, summary, metrics), metrics=metrics)


def load_runs(directory: Path) -> list[RunRecord]:
    """A run directory itself, or every finished run directory below it (a sweep)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    if is_finished(directory):
        return [load_run(directory)]
    runs = [load_run(path.parent) for path in sorted(directory.glob("**/summary.json"))]
    if not runs:
        raise FileNotFoundError(f"{directory} holds no finished run (no summary.json below it)")
    return runs
