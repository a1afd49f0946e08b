"""Figures in the paper's layout, from run directories (matplotlib, PNG).

* sweep.png:    columns = learning rate, curves = S; rows = training reward, Grad CosSim, validation
                reward (the paper's Figures 1-2).
* per_s.png:    one panel per (S, learning rate) of training reward (the paper's Figures 4-5).
* collapse.png: collapse step T_c against eta and against S, log-log.
* stabilizers.png: each stabilizer against the fixed learning rate at the same (S, base eta).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stalerl.collapse import moving_average  # noqa: E402
from stalerl.lab.runs import RunRecord, load_runs  # noqa: E402

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


def collapse_figure(runs: list[RunRecord], path: Path) -> Path | None:
    runs = fixed_lr_runs(runs)
    if not runs:
        return None
    figure, (by_lr, by_s) = plt.subplots(1, 2, figsize=(9, 3.8))
    staleness = sorted({r.staleness for r in runs})
    colors = _colors(staleness)
    for s in staleness:
        hit = sorted((r for r in runs if r.staleness == s and r.collapse_step), key=lambda r: r.lr)
        censored = [r for r in runs if r.staleness == s and r.collapse_step is None]
        by_lr.plot([r.lr for r in hit], [r.collapse_step for r in hit], marker="o", color=colors[s], label=f"S={s}")
        by_lr.scatter([r.lr for r in censored], [r.summary["steps"] for r in censored], marker="^",
                      facecolors="none", edgecolors=colors[s])
    lrs = sorted({r.lr for r in runs})
    lr_colors = _colors(lrs)
    for lr in lrs:
        hit = sorted((r for r in runs if r.lr == lr and r.collapse_step and r.staleness > 0), key=lambda r: r.staleness)
        if hit:
            by_s.plot([r.staleness for r in hit], [r.collapse_step for r in hit], marker="o", color=lr_colors[lr],
                      label=f"lr={lr:g}")
    for ax, xlabel in ((by_lr, "learning rate eta"), (by_s, "staleness S")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("collapse step T_c")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
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
    names = sorted({r.stabilizer for r in runs}, key=lambda n: (n != "none", n))
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(2, len(cells), figsize=(4 * len(cells), 6), squeeze=False, sharey="row")
    for column, (s, lr) in enumerate(cells):
        for run in sorted((r for r in runs if r.staleness == s and r.lr == lr), key=lambda r: names.index(r.stabilizer)):
            label = "fixed lr" if run.stabilizer == "none" else run.stabilizer
            axes[0][column].plot(run.series("step"), _smooth(run.series("train_reward")), color=colors[run.stabilizer],
                                 label=label)
            points = [(st, v) for st, v in zip(run.series("step"), run.series("val_reward")) if v is not None]
            axes[1][column].plot([p[0] for p in points], [p[1] for p in points], marker=".",
                                 color=colors[run.stabilizer], label=label)
        axes[0][column].set_title(f"S = {s}, base lr = {lr:g}")
        axes[1][column].set_xlabel("learner step")
    axes[0][0].set_ylabel("training reward (5-step mean)")
    axes[1][0].set_ylabel("validation reward")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def sweep_figures(directory: Path) -> list[Path]:
    runs = load_runs(directory)
    directory = Path(directory)
    seed = min((r.seed for r in fixed_lr_runs(runs)), default=None)
    paths = [
        sweep_figure(runs, directory / "sweep.png", seed),
        per_staleness_figure(runs, directory / "per_s.png", seed),
        collapse_figure(runs, directory / "collapse.png"),
        stabilizer_figure(runs, directory / "stabilizers.png"),
    ]
    return [path for path in paths if path is not None]
