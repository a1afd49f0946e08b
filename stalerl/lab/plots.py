"""Figures in the paper's layout, from run directories (matplotlib, PNG).

* sweep.png:    columns = learning rate, curves = S; rows = training reward, Grad CosSim, validation
                reward (the paper's Figures 1-2).
* per_s.png:    one panel per (S, learning rate) of training reward (the paper's Figures 4-5).
* collapse.png: T_c (the collapsed policy version, as advise fits it) against eta and against S.
* stabilizers.png: each stabilizer against the fixed learning rate at the same (S, base eta).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stalerl.collapse import moving_average  # noqa: E402
from stalerl.config import StabilizerConfig  # noqa: E402
from stalerl.lab.runs import RunRecord, horizon_version, load_runs  # noqa: E402

ROWS = [("train_reward", "training reward"), ("grad_cos_sim", "Grad CosSim"), ("val_reward", "validation reward")]


def _smooth(values: list, window: int = 5) -> np.ndarray:
    """Trailing mean; a missing value (Grad CosSim at step 0) stays missing and does not spread."""
    present = np.array([v is not None for v in values])
    smoothed = np.full(len(values), np.nan)
    if present.any():
        smoothed[present] = moving_average([v for v in values if v is not None], window)
    return smoothed


def _colors(values: list) -> dict:
    cmap = plt.get_cmap("viridis")
    return {v: cmap(i / max(len(values) - 1, 1)) for i, v in enumerate(values)}


def fixed_lr_runs(runs: list[RunRecord], seed: int | None = None) -> list[RunRecord]:
    return [r for r in runs if r.stabilizer == "none" and (seed is None or r.seed == seed)]


# The sweep, per-S and collapse figures draw fixed-lr runs; a directory of stabilizer runs only
# (`stalerl sweep --stabilizers staleness`) has none of them, and gets the stabilizer figure alone.

def sweep_figure(runs: list[RunRecord], path: Path, seed: int | None = None) -> Path | None:
    runs = fixed_lr_runs(runs, seed)
    if not runs:
        return None
    lrs = sorted({r.lr for r in runs})
    staleness = sorted({r.staleness for r in runs})
    colors = _colors(staleness)
    figure, axes = plt.subplots(3, len(lrs), figsize=(3.6 * len(lrs), 8.4), squeeze=False, sharey="row")
    for column, lr in enumerate(lrs):
        for run in sorted((r for r in runs if r.lr == lr), key=lambda r: r.staleness):
            steps = run.series("step")
            for row, (key, _) in enumerate(ROWS):
                ax = axes[row][column]
                values = run.series(key)
                if key == "val_reward":
                    points = [(s, v) for s, v in zip(steps, values) if v is not None]
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", color=colors[run.staleness],
                            label=f"S={run.staleness}")
                else:
                    ax.plot(steps, _smooth(values), color=colors[run.staleness], label=f"S={run.staleness}")
                if row == 0 and run.collapse_step is not None:
                    ax.axvline(run.collapse_step, color=colors[run.staleness], linestyle=":", linewidth=1)
        axes[0][column].set_title(f"lr = {lr:g}")
        axes[-1][column].set_xlabel("learner step")
    for row, (_, label) in enumerate(ROWS):
        axes[row][0].set_ylabel(label)
    axes[0][0].legend(title="staleness", fontsize=8)
    figure.suptitle("Staleness x learning-rate sweep (curves: 5-step moving average; dotted: collapse step)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def per_staleness_figure(runs: list[RunRecord], path: Path, seed: int | None = None) -> Path | None:
    runs = fixed_lr_runs(runs, seed)
    if not runs:
        return None
    lrs = sorted({r.lr for r in runs})
    staleness = sorted({r.staleness for r in runs})
    colors = _colors(lrs)
    figure, axes = plt.subplots(1, len(staleness), figsize=(4 * len(staleness), 3.4), squeeze=False, sharey=True)
    for column, s in enumerate(staleness):
        ax = axes[0][column]
        for run in sorted((r for r in runs if r.staleness == s), key=lambda r: r.lr):
            ax.plot(run.series("step"), _smooth(run.series("train_reward")), color=colors[run.lr], label=f"lr={run.lr:g}")
        ax.set_title(f"S = {s}")
        ax.set_xlabel("learner step")
    axes[0][0].set_ylabel("training reward (5-step mean)")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def collapse_points(runs: list[RunRecord], seed: int | None = None) -> dict[str, dict]:
    """What collapse.png draws, T_c as the collapsed policy version (what advise fits):
    by_eta[S] = (lrs, versions) of the collapsed runs, censored[S] = (lrs, newest version seen) of the
    others, by_s[lr] = (S values, versions) of the collapsed runs with S > 0. A collapse at version 0 is kept.
    One seed's runs (as in sweep.png), so that each line joins one run per point."""
    runs = fixed_lr_runs(runs, seed)
    by_eta, censored, by_s = {}, {}, {}
    for s in sorted({r.staleness for r in runs}):
        hit = sorted((r for r in runs if r.staleness == s and r.collapse_version is not None), key=lambda r: r.lr)
        rest = [r for r in runs if r.staleness == s and r.collapse_version is None]
        by_eta[s] = ([r.lr for r in hit], [r.collapse_version for r in hit])
        censored[s] = ([r.lr for r in rest], [horizon_version(r) for r in rest])
    for lr in sorted({r.lr for r in runs}):
        hit = sorted((r for r in runs if r.lr == lr and r.collapse_version is not None and r.staleness > 0),
                     key=lambda r: r.staleness)
        if hit:
            by_s[lr] = ([r.staleness for r in hit], [r.collapse_version for r in hit])
    return {"by_eta": by_eta, "censored": censored, "by_s": by_s}


def collapse_figure(runs: list[RunRecord], path: Path, seed: int | None = None) -> Path | None:
    """collapse_points drawn; the y axis is logarithmic above 1 and linear below, so version 0 shows too."""
    runs = fixed_lr_runs(runs, seed)
    if not runs:
        return None
    points = collapse_points(runs)
    figure, (by_lr, by_s) = plt.subplots(1, 2, figsize=(9, 3.8))
    colors = _colors(list(points["by_eta"]))
    for s, (lrs, versions) in points["by_eta"].items():
        by_lr.plot(lrs, versions, marker="o", color=colors[s], label=f"S={s}")
        by_lr.scatter(*points["censored"][s], marker="^", facecolors="none", edgecolors=colors[s])
    lr_colors = _colors(sorted({r.lr for r in fixed_lr_runs(runs)}))
    for lr, (staleness, versions) in points["by_s"].items():
        by_s.plot(staleness, versions, marker="o", color=lr_colors[lr], label=f"lr={lr:g}")
    for ax, xlabel in ((by_lr, "learning rate eta"), (by_s, "staleness S")):
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0, linscale=0.5)
        ax.set_ylim(bottom=0)
        top = ax.get_ylim()[1]
        ax.set_yticks([v for v in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if v <= top])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("T_c: collapsed policy version")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    stale = sorted({s for staleness, _ in points["by_s"].values() for s in staleness})
    if stale:
        by_s.set_xticks(stale, [str(s) for s in stale])
        by_s.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    by_lr.set_title("T_c vs eta (open triangles: no collapse by T)")
    by_s.set_title("T_c vs S (S > 0)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def stabilizer_figure(runs: list[RunRecord], path: Path) -> Path | None:
    """Per (S, lr) that has stabilizer runs: train and validation reward of each stabilizer vs fixed lr."""
    cells = sorted({(r.staleness, r.lr) for r in runs if r.stabilizer != "none"})
    if not cells:
        return None
    names = sorted({stabilizer_label(r) for r in runs}, key=lambda n: (n != "fixed lr", n))
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(2, len(cells), figsize=(4 * len(cells), 6), squeeze=False, sharey="row")
    for column, (s, lr) in enumerate(cells):
        for run in sorted((r for r in runs if r.staleness == s and r.lr == lr), key=lambda r: names.index(stabilizer_label(r))):
            label = stabilizer_label(run)
            axes[0][column].plot(run.series("step"), _smooth(run.series("train_reward")), color=colors[label],
                                 label=label)
            points = [(st, v) for st, v in zip(run.series("step"), run.series("val_reward")) if v is not None]
            axes[1][column].plot([p[0] for p in points], [p[1] for p in points], marker=".",
                                 color=colors[label], label=label)
        axes[0][column].set_title(f"S = {s}, base lr = {lr:g}")
        axes[1][column].set_xlabel("learner step")
    axes[0][0].set_ylabel("training reward (5-step mean)")
    axes[1][0].set_ylabel("validation reward")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def stabilizer_label(run: RunRecord) -> str:
    """The legend of a stabilizer's line; the staleness-aware rate's R_batch is part of it."""
    if run.stabilizer == "none":
        return "fixed lr"
    if "staleness" in run.stabilizer:
        r_batch = run.config.get("stabilizer", {}).get("r_batch", StabilizerConfig.r_batch)
        return f"{run.stabilizer} (R_batch {r_batch:g})"
    return run.stabilizer


def sweep_figures(directory: Path, more: tuple[Path, ...] = ()) -> list[Path]:
    """The figures of the runs below `directory` and any `more` directories, written into `directory`."""
    runs = [run for source in (directory, *more) for run in load_runs(source)]
    directory = Path(directory)
    seed = min((r.seed for r in fixed_lr_runs(runs)), default=None)
    paths = [
        sweep_figure(runs, directory / "sweep.png", seed),
        per_staleness_figure(runs, directory / "per_s.png", seed),
        collapse_figure(runs, directory / "collapse.png", seed),
        stabilizer_figure(runs, directory / "stabilizers.png"),
    ]
    return [path for path in paths if path is not None]
