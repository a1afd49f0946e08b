"""Two git revisions of stalerl, side by side: the embedded default's step time on each.

    python benchmarks/compare_revisions.py 00030f1 HEAD --staleness 0 --steps 30 --repeats 7
    python benchmarks/compare_revisions.py 00030f1 HEAD --set model.name_or_path=CKPT \
        --set task.name=math --set task.data=data/gsm8k_sample.jsonl --set rollout.max_new_tokens=64

Each revision is checked out into a temporary git worktree; each run is a fresh interpreter that
imports stalerl from its revision (PYTHONPATH), with this environment's torch and transformers.
Runs alternate between the revisions, so machine noise hits both. Each run is the revision's own
`stalerl.bench.runs.train_run` (`stalerl.bench.train_run` before the bench package), which times a
step as `stalerl bench` does (the first 5 steps are not timed). Prints medians and the ratio; writes nothing but temporary run directories and worktrees
(removed at the end; after a killed run, `git worktree prune` drops their entries).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from stalerl.config import parse_assignment

RUN = r'''
import json, sys
try:
    from stalerl.bench.plan import base_config
    from stalerl.bench.runs import train_run
except ModuleNotFoundError:  # a revision from before the bench package: one module, stalerl/bench.py
    from stalerl.bench import base_config, train_run
from stalerl.config import override
steps, staleness, out, changes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
config = override(base_config(steps=steps, **{"staleness.staleness": staleness, **changes}), {"out": out})
print(json.dumps(train_run(config.to_dict(), 5)))
'''


def timed_run(tree: Path, steps: int, staleness: int, out: Path, changes: dict) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", RUN, str(steps), str(staleness), str(out), json.dumps(changes)],
                          cwd=tree, env=environment, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"a run at {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs=2, help="two git revisions (commits, branches, tags)")
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field for both sides, as `stalerl train --set` takes it (repeatable)")
    args = parser.parse_args()
    if args.steps <= 5 or args.repeats < 1:
        raise SystemExit("--steps must be > 5 (the first 5 are not timed) and --repeats >= 1")
    changes = dict(parse_assignment(text) for text in args.set)
    repository = Path(__file__).resolve().parent.parent
    for revision in args.revisions:
        known = subprocess.run(["git", "-C", str(repository), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                               capture_output=True)
        if known.returncode:
            raise SystemExit(f"compare_revisions: {revision!r} is not a commit of {repository}")
    with tempfile.TemporaryDirectory(prefix="stalerl-compare-") as scratch:
        trees: list[Path] = []
        try:
            for index, revision in enumerate(args.revisions):
                tree = Path(scratch) / f"tree-{index}"
                subprocess.run(["git", "-C", str(repository), "worktree", "add", "--detach", "-q", str(tree),
                                revision], check=True)
                trees.append(tree)
            runs: list[list[dict]] = [[], []]
            for repeat in range(args.repeats):
                for index, tree in enumerate(trees):
                    runs[index].append(timed_run(tree, args.steps, args.staleness,
                                                 Path(scratch) / f"run-{index}-{repeat}", changes))
        finally:
            for tree in trees:
                subprocess.run(["git", "-C", str(repository), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"S = {args.staleness}, {args.steps} steps (5 untimed), {args.repeats} alternating repeats, medians:")
    for revision, side in zip(args.revisions, runs):
        print(f"  {revision:>12}: {statistics.median(r['s_per_step'] for r in side):.4f} s a step "
              f"(learner {statistics.median(r['train_s'] for r in side):.4f} s, "
              f"sampling {statistics.median(r['gen_s'] for r in side):.4f} s, rollout side with reward "
              f"and weight load {statistics.median(r['rollout_s'] for r in side):.4f} s)")
    first, second = (statistics.median(r["s_per_step"] for r in side) for side in runs)
    print(f"  {args.revisions[1]} takes {second / first:.3f}x the time of {args.revisions[0]}")


if __name__ == "__main__":
    main()
