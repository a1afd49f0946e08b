"""Stopping a sweep: Ctrl-C and SIGTERM stop it as they stop a run (one line, a checkpoint in every
running cell, nothing else started), and a sweep killed outright leaves no worker writing on."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from processes import children_of, descendants_of, is_gone, made_by

from stalerl.checkpoint import newest_valid

CELL = "S2-lr0.0001-seed0"


def start_sweep(out: Path, steps: int, workers: int, lrs: str = "1e-4", output=subprocess.PIPE) -> subprocess.Popen:
    # A session of its own, as a terminal's job: a signal to its process group is what Ctrl-C sends.
    argv = [sys.executable, "-m", "stalerl.cli", "sweep", "-S", "2", "--lr", lrs, "--steps", str(steps),
            "--out", str(out), "--workers", str(workers), "--no-progress", "--no-figures",
            "--set", "rollout.prompts_per_step=4", "--set", "checkpoint.every=0"]
    return subprocess.Popen(argv, stdout=output, stderr=output, text=True, start_new_session=True)


def wait_for(path: Path, sweep: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if sweep.poll() is not None or time.monotonic() > deadline:
            sweep.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


def wait_for_steps(sweep: subprocess.Popen, metrics: Path, steps: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        if sweep.poll() is not None:
            raise AssertionError(f"the sweep ended early: {sweep.communicate()}")
        time.sleep(0.2)
    sweep.kill()
    raise AssertionError("the cell made no steps in time")


def test_ctrl_c_stops_a_sweep_in_one_line_with_a_checkpoint_in_the_running_cell(tmp_path):
    out = tmp_path / "sweep"
    sweep = start_sweep(out, steps=2000, workers=2)  # one cell, so one worker idles
    wait_for_steps(sweep, out / CELL / "metrics.jsonl", 3)
    os.killpg(sweep.pid, signal.SIGINT)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "SIGINT: the sweep stops" in stderr
    assert "sweep stopped, 0 of 1 cells finished (1 stopped or not started); rerun the same command" in stderr
    assert "stopping after this step with a checkpoint" in stderr  # the cell's own line: it got the signal
    assert f"stalerl: {CELL}: stopped by SIGINT after step" in stderr and "--resume" in stderr  # and where it stopped
    assert newest_valid(out / CELL) is not None
    assert not (out / CELL / "summary.json").exists()
    steps_done = len((out / CELL / "metrics.jsonl").read_text().splitlines())
    assert steps_done < 2000 and json.loads((out / "sweep.json").read_text()) == []


def test_ctrl_c_while_a_cell_starts_stops_it_after_its_first_step(tmp_path):
    """The worker ignored signals until the cell's train() took them, after the model and the first
    validation: a Ctrl-C in that window was lost and the cell ran to its end."""
    out = tmp_path / "sweep"
    sweep = start_sweep(out, steps=300, workers=1)
    wait_for(out / CELL / "config.yaml", sweep)  # the run directory is made before the model is built
    os.killpg(sweep.pid, signal.SIGINT)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "Traceback" not in stderr, stderr
    assert "0 of 1 cells finished" in stderr
    assert len((out / CELL / "metrics.jsonl").read_text().splitlines()) <= 2
    assert newest_valid(out / CELL) is not None


def test_a_killed_sweep_leaves_no_worker_training(tmp_path):
    out = tmp_path / "sweep"
    # two cells on one worker: the second waits in the pool's queue, which the orphan could still read
    sweep = start_sweep(out, steps=2000, workers=1, lrs="1e-4,3e-4", output=subprocess.DEVNULL)
    wait_for_steps(sweep, out / CELL / "metrics.jsonl", 3)
    workers = made_by(sweep.pid)
    assert len(workers) == 1, workers
    servers = [pid for pid in children_of(sweep.pid) if "forkserver" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert torch.cuda.is_available() or children_of(servers[0]) == workers  # on CPU, forked by the server
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.monotonic() + 60
    while not is_gone(workers[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not is_gone(workers[0]):
        os.kill(workers[0], signal.SIGKILL)
        raise AssertionError("the sweep's worker went on training for a minute after the sweep was killed")
    assert newest_valid(out / CELL) is not None  # it stopped as on SIGTERM: after its step, with a checkpoint
    assert not (out / CELL / "summary.json").exists()
    assert not (out / "S2-lr0.0003-seed0").exists()  # and did not start the queued cell


def test_sigterm_to_every_process_of_the_job_still_checkpoints(tmp_path):
    """systemd, Slurm's scancel or `kill -TERM` of the whole job: the worker gets the job's SIGTERM and
    the one the sweep passes on, and took the second for "quit at once", losing its checkpoint."""
    out = tmp_path / "sweep"
    sweep = start_sweep(out, steps=2000, workers=1)
    wait_for_steps(sweep, out / CELL / "metrics.jsonl", 3)
    job = [sweep.pid, *descendants_of(sweep.pid)]
    assert len(made_by(sweep.pid)) == 1
    for pid in job:  # the sweep, its worker, and on CPU the fork server that forked the worker
        os.kill(pid, signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "Traceback" not in stderr, stderr
    assert newest_valid(out / CELL) is not None


def test_a_sweep_killed_after_ctrl_c_still_leaves_the_cells_checkpoint(tmp_path):
    """The worker's own SIGTERM on finding its sweep gone came on top of the Ctrl-C: a second signal."""
    out = tmp_path / "sweep"
    sweep = start_sweep(out, steps=2000, workers=1, output=subprocess.DEVNULL)
    metrics = out / CELL / "metrics.jsonl"
    wait_for_steps(sweep, metrics, 3)
    [worker] = made_by(sweep.pid)
    os.killpg(sweep.pid, signal.SIGINT)
    time.sleep(0.05)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.monotonic() + 60
    while not is_gone(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert is_gone(worker)
    assert newest_valid(out / CELL) is not None
