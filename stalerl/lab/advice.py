"""``stalerl advise``: the two-constraint stability condition with the measured constants.

    stalerl advise RUN_OR_SWEEP_DIR [--staleness S] [--steps T]

Reads the runs below the directory (a full sweep or a short probe), estimates R_crit and R_batch
and how far the policy drifts per learning rate (law.py), and for each requested S prints the
predicted largest stable learning rate (the smaller of: cumulative drift at T reaches R_crit,
first-cycle drift at S reaches R_batch), which constraint is active, the range the radii's spreads
allow, a recommended learning rate (half the boundary, since the law says eta << bound), the law's
ballistic reading min{R_batch / (S G_upd), R_crit / (T G_upd)} beside it, and what it could not
estimate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from stalerl.lab.law import law_report
from stalerl.lab.runs import load_runs
from stalerl.metrics import finite_or_none


def _format(estimate: dict | None, name: str) -> str:
    if estimate is None:
        return f"  {name:<8} not estimated"
    return (f"  {name:<8} {estimate['value']:.4g}  (spread {estimate['low']:.4g} .. {estimate['high']:.4g}, "
            f"{estimate['count']} run{'s' if estimate['count'] != 1 else ''}; {estimate['how']})")


def advise_directory(directory: Path, staleness: list[int] | None, horizon: int | None,
                     clip_threshold: float = 0.05, safety: float = 0.5) -> dict[str, Any]:
    runs = load_runs(directory)
    horizon = horizon or max(run.summary["steps"] for run in runs)
    staleness = staleness if staleness is not None else sorted({run.staleness for run in runs})
    return law_report(runs, staleness, horizon, clip_threshold, safety)


def print_report(report: dict[str, Any]) -> None:
    left_out = report.get("stabilizer_runs_left_out", 0)
    too_short = report.get("too_short_left_out", 0)
    notes = [f"{left_out} stabilizer run(s)"] * bool(left_out) + [
        f"{too_short} run(s) too short to judge (fewer steps than collapse.min_tail)"] * bool(too_short)
    print(f"constants from {report['runs']} fixed-learning-rate run(s), {report['steps_run']} learner steps"
          + (f" ({' and '.join(notes)} left out):" if notes else ":"))
    for key, name in (("g_upd", "G_upd"), ("r_crit", "R_crit"), ("r_batch", "R_batch")):
        print(_format(report[key], name))
    for key, fit in report["drift_fits"].items():
        if fit is None:
            print(f"  drift at {key}: no stable run to measure it")
            continue
        if fit["assumed_slope"]:
            slope = "1 (assumed: one learning rate)"
        elif math.isnan(fit["slope_low"]):
            slope = f"{fit['slope']:.2f} (two learning rates: no interval)"
        else:
            slope = f"{fit['slope']:.2f} [{fit['slope_low']:.2f}, {fit['slope_high']:.2f}]"
        print(f"  {fit['what']}: ~ eta^{slope} over {fit['runs']} stable run(s)")
    by_s = report["collapse"]["by_staleness"]
    if by_s:
        print("observed: S  largest stable lr  smallest collapsing lr  T_c*eta (median; T_c: collapsed version)")
        for s, row in by_s.items():
            tc = row["tc_eta"]["value"] if row["tc_eta"] else None
            print(f"  {s:>8}  {row['largest_stable_lr'] or '-':>17}  {row['smallest_collapsing_lr'] or '-':>22}  "
                  f"{'-' if tc is None else f'{tc:.4g}'}")
    for key, name in (("tc_vs_eta", "T_c ~ eta^b within each S"),
                      ("tc_vs_eta_past_first_update", "the same without the runs at T_c = 1"),
                      ("tc_vs_eta_censored", "the same with the runs that did not collapse (censored fit)"),
                      ("tc_vs_s", "T_c ~ S^c at fixed eta (S > 0)")):
        fit = report["collapse"].get(key)
        if fit is not None:
            interval = "" if math.isnan(fit["slope_low"]) else f" [{fit['slope_low']:.2f}, {fit['slope_high']:.2f}]"
            print(f"  {name}: {fit['slope']:.2f}{interval} ({_fit_runs(fit)})")
    for advice in report["advice"]:
        head = f"S={advice['staleness']}, T={advice['horizon']}:"
        if advice["boundary_lr"] is None:
            print(f"{head} no advice: {'; '.join(advice['missing'])}")
            continue
        if advice["active"] is None:  # S > 0 without the stale-rollout limit: the horizon's is only a bound
            bound, active = "at most", "unknown (the horizon limit alone; the stale-rollout one is not estimated)"
        else:
            bound, active = "~", advice["active"]
        print(f"{head} largest stable lr {bound} {advice['boundary_lr']:.3g} (range {advice['boundary_low']:.3g} .. "
              f"{advice['boundary_high']:.3g}); recommended lr {advice['recommended_lr']:.3g}; "
              f"active constraint: {active}"
              + ("" if advice["ballistic_lr"] is None else
                 f"; the law's ballistic form{' (horizon alone)' if advice['active'] is None else ''} "
                 f"would say {advice['ballistic_lr']:.3g}"))
        for missing in advice["missing"]:
            print(f"    could not estimate {missing}")


def _fit_runs(fit: dict[str, Any]) -> str:
    if "censored" not in fit:
        return f"{fit['points']} collapsed runs"
    left_out = f"; S = {', '.join(map(str, fit['s_left_out']))} left out" if fit["s_left_out"] else ""
    return (f"{fit['collapsed']} collapsed runs ({fit['at_floor']} at T_c = 1, read as T_c <= 1) and "
            f"{fit['censored']} censored; sigma {fit['sigma']:.2f} in log T_c{left_out}")


def write_report(report: dict[str, Any], path: Path) -> None:
    # JSON has no NaN (an interval that two points leave undetermined): null, which strict parsers read
    path.write_text(json.dumps(finite_or_none(report), indent=2, default=str))
