"""``stalerl advise``: the two-constraint stability condition with the measured constants.

    stalerl advise RUN_OR_SWEEP_DIR [--staleness S] [--steps T]

Reads the runs below the directory (a full sweep or a short probe), estimates G_upd, R_crit and
R_batch (law.py), and for each requested S prints the predicted largest stable learning rate
min{R_batch / (S G_upd), R_crit / (T G_upd)}, which constraint is active, the range the estimates'
spreads allow, a recommended learning rate (half the boundary, since the law says eta << bound),
and what it could not estimate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stalerl.lab.law import Estimate, advise, estimate_g_upd, estimate_r_batch, estimate_r_crit, law_report
from stalerl.lab.runs import load_runs


def _format(estimate: dict | None, name: str) -> str:
    if estimate is None:
        return f"  {name:<8} not estimated"
    return (f"  {name:<8} {estimate['value']:.4g}  (spread {estimate['low']:.4g} .. {estimate['high']:.4g}, "
            f"{estimate['count']} run{'s' if estimate['count'] != 1 else ''}; {estimate['how']})")


def advise_directory(directory: Path, staleness: list[int] | None, horizon: int | None,
                     clip_threshold: float = 0.05, safety: float = 0.5) -> dict[str, Any]:
    runs = load_runs(directory)
    report = law_report(runs, clip_threshold)
    g_upd, r_crit, r_batch = (estimate_g_upd(runs), estimate_r_crit(runs), estimate_r_batch(runs, clip_threshold))
    horizon = horizon or max(run.summary["steps"] for run in runs)
    staleness = staleness if staleness is not None else sorted({run.staleness for run in runs})
    report["advice"] = [advise(g_upd, r_crit, r_batch, s, horizon, safety).to_dict() for s in staleness]
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"constants from {report['runs']} run(s):")
    for key, name in (("g_upd", "G_upd"), ("r_crit", "R_crit"), ("r_batch", "R_batch")):
        print(_format(report[key], name))
    by_s = report["collapse"]["by_staleness"]
    if by_s:
        print("observed: S  largest stable lr  smallest collapsing lr  T_c*eta (median)")
        for s, row in by_s.items():
            tc = row["tc_eta"]["value"] if row["tc_eta"] else None
            print(f"  {s:>8}  {row['largest_stable_lr'] or '-':>17}  {row['smallest_collapsing_lr'] or '-':>22}  "
                  f"{'-' if tc is None else f'{tc:.4g}'}")
    for advice in report["advice"]:
        head = f"S={advice['staleness']}, T={advice['horizon']}:"
        if advice["boundary_lr"] is None:
            print(f"{head} no advice: {'; '.join(advice['missing'])}")
            continue
        print(f"{head} largest stable lr ~ {advice['boundary_lr']:.3g} (range {advice['boundary_low']:.3g} .. "
              f"{advice['boundary_high']:.3g}); recommended lr {advice['recommended_lr']:.3g}; "
              f"active constraint: {advice['active']}")
        for missing in advice["missing"]:
            print(f"    could not estimate {missing}")


def estimates_as_objects(report: dict[str, Any]) -> tuple[Estimate | None, ...]:
    return tuple(Estimate(**report[k]) if report[k] else None for k in ("g_upd", "r_crit", "r_batch"))


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))
