"""The learner's update geometry (metrics.UpdateTracker.after_step) on one large parameter vector:
what drift, Grad CosSim and G_upd cost a step, with the vectors on the model's device and in host
memory (runtime.update_geometry), and how much memory they hold.

    python benchmarks/update_geometry.py [--mode device|host] [--floats 268435456] [--threads 1] [--steps 6]
        [--device cuda]

Prints the median time of `after_step` after the first step, the bytes a parameter that the
tracker's vectors hold, and by how much the peak RSS grew over the steps (a CPU measure: what the
steps made beyond theta_0, transient copies included; one mode a process, so that the peak is its
own). To compare two revisions, run it under each one's PYTHONPATH.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from stalerl.metrics import UpdateTracker


def time_tracker(floats: int, device: str, on_host: bool, steps: int) -> tuple[float, float, float]:
    """(median seconds a step after the first, bytes a parameter that the tracker's vectors hold, and
    bytes a parameter by which the process's peak RSS grew over the steps: what they made beyond theta_0)."""
    model = torch.nn.Linear(floats // 1024, 1024, bias=False, device=device)
    # an earlier revision, which has no host mode, can be timed on the device
    tracker = UpdateTracker(model, 0, None, on_host=True) if on_host else UpdateTracker(model, 0, None)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    seconds = []
    for _ in range(steps):
        with torch.no_grad():
            model.weight.add_(1e-3)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tracker.after_step(model)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    vectors = {tracker.theta_0.dense.data_ptr(): tracker.theta_0.dense, tracker.previous.dense.data_ptr():
               tracker.previous.dense, tracker.previous_update.dense.data_ptr(): tracker.previous_update.dense}
    staging = getattr(tracker, "staging", None)  # an earlier revision has none
    if staging is not None:
        vectors[staging.data_ptr()] = staging
    held = sum(v.numel() * v.element_size() for v in vectors.values())
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    return statistics.median(seconds[1:]), held / floats, grown / floats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floats", type=int, default=256 * 2**20, help="parameters (a multiple of 1024)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the learner's `threads`)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="where the parameters live: cpu or cuda")
    parser.add_argument("--mode", choices=("device", "host"), default="device",
                        help="runtime.update_geometry (host: not in revisions before it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds, held, grown = time_tracker(args.floats, args.device, args.mode == "host", args.steps)
    where = "host memory" if args.mode == "host" else f"the model's device ({args.device})"
    print(f"{args.floats / 1e6:.0f}M parameters, vectors in {where}, {args.threads} thread(s): "
          f"{seconds * 1e3:.0f} ms a step ({seconds / args.floats * 1e9:.2f} ns a parameter); its vectors "
          f"hold {held:.0f} bytes a parameter, and the peak RSS grew by {grown:.1f} bytes a parameter over the steps")


if __name__ == "__main__":
    main()
