"""Checkpoints and resume: a run killed at any step goes on as if nothing happened (exact mode),
or at least loses and repeats nothing (bounded mode); a corrupt checkpoint falls back to the one
before; the pipeline's snapshot/restart with stub engines."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import descendants_of, is_gone, made_by

import stalerl.train as train_module
from stalerl import checkpoint
from stalerl.cli import main
from stalerl.config import CheckpointConfig, ConfigError
from stalerl.guards import Interrupted
from stalerl.metrics import read_metrics
from stalerl.staleness import PipelineState, ThreadedRollouts
from stalerl.train import train

ROOT = Path(__file__).resolve().parent.parent


def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def cli_train(out, mode, steps):
    return [sys.executable, "-m", "stalerl.cli", "train", "--steps", str(steps), "--staleness", "2", "--mode", mode,
            "--seed", "5", "--out", str(out), "--no-progress", "--val-every", "4", "--set", "checkpoint.every=3",
            "--set", "rollout.prompts_per_step=8", "--set", "rollout.group_size=4", "--set", "task.val_size=64",
            "--set", "tensorboard=false"]


def kill_after(args, metrics_path, lines, timeout=120):
    """Starts `args`, waits until metrics.jsonl has `lines` lines, then SIGKILLs it."""
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not (metrics_path.exists() and metrics_path.read_bytes().count(b"\n") >= lines):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run did not reach the kill point"
        time.sleep(0.01)
    process.kill()
    process.wait()
    process.stderr.close()


def resume(out):
    done = subprocess.run([sys.executable, "-m", "stalerl.cli", "train", "--resume", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    steps, kill_at = 14, random.randint(2, 9)
    reference = tmp_path / "reference"
    # The reference goes through the same command line, in this process (which also builds the warm-start cache).
    assert main(cli_train(reference, "exact", steps)[3:]) == 0
    killed = tmp_path / "killed"
    kill_after(cli_train(killed, "exact", steps), killed / "metrics.jsonl", kill_at)
    assert not (killed / "summary.json").exists(), "the run finished before the kill"
    print(f"killed after {len(read_metrics(killed))} finished steps (asked for {kill_at})")
    resume(killed)
    assert without_timings(read_metrics(killed)) == without_timings(read_metrics(reference))
    assert (killed / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (reference, killed)]
    for summary in summaries:
        for key in ("wall_s", "cpu_s", "final_checkpoint", "environment"):  # the process's, not the run's
            summary.pop(key)
    assert summaries[0] == summaries[1]


def test_sigkill_then_resume_in_bounded_mode_loses_and_repeats_no_sample(tmp_path):
    steps, staleness = 14, 2
    killed = tmp_path / "killed"
    kill_after(cli_train(killed, "bounded", steps), killed / "metrics.jsonl", random.randint(2, 9))
    assert not (killed / "summary.json").exists()
    resume(killed)
    samples = read_lines(killed / "samples.jsonl")
    assert [row["step"] for row in samples] == list(range(steps))
    ids = [i for row in samples for i in row["sample_ids"]]
    assert sorted(ids) == list(range(steps * 32))  # 8 prompts x 4 samples a step, each exactly once
    lags = [row["step"] - version for row in samples for version in row["versions"]]
    assert 0 <= min(lags) and max(lags) <= staleness
    assert [row["step"] for row in read_metrics(killed)] == list(range(steps))


def stop_at(monkeypatch, step, signum=signal.SIGTERM):
    """Sends `signum` to this process while learner step `step` runs (the handler lets it finish)."""
    real, calls = train_module.learner_step, []

    def learner_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step + 1:
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "learner_step", learner_step)


def small(small_config, out, **changes):
    config = dataclasses.replace(small_config, out=str(out), seed=5, steps=10, val_every=4, **changes)
    return dataclasses.replace(config, staleness=dataclasses.replace(config.staleness, staleness=2),
                               checkpoint=dataclasses.replace(config.checkpoint, every=2, keep=2))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_process_worker_does_not_outlive_a_killed_learner(tmp_path):
    out = tmp_path / "killed"
    args = cli_train(out, "exact", 40) + ["--set", "runtime.local_worker=process"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_bytes().count(b"\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    worker, = made_by(process.pid)  # on CPU the fork server's child, not the learner's
    processes = descendants_of(process.pid)  # the worker, the fork server, the resource tracker
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while not is_gone(worker):
        assert time.monotonic() < deadline, "the rollout worker outlived its learner"
        time.sleep(0.1)
    while not all(is_gone(pid) for pid in processes):
        assert time.monotonic() < deadline, "a process of the killed learner's run outlived it"
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_sigterm_to_every_process_of_a_process_workers_run_checkpoints_and_resumes(tmp_path):
    """A scheduler's SIGTERM reaches the learner, the fork server and the rollout worker at once. The
    worker ignores it and the learner stops after its step with a checkpoint, for which exact mode
    needs batches that the worker still makes; the run then goes on bit for bit."""
    steps = 12
    reference = tmp_path / "reference"
    assert main(cli_train(reference, "exact", steps)[3:]) == 0
    out = tmp_path / "run"
    args = cli_train(out, "exact", steps) + ["--set", "runtime.local_worker=process", "--set", "checkpoint.every=0"]
    # A session of its own, as a scheduler's job: the signal goes to its whole process group.
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_bytes().count(b"\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    assert len(made_by(process.pid)) == 1  # the worker, in the same process group
    os.killpg(process.pid, signal.SIGTERM)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error
    assert "stopped by SIGTERM after step" in error and "continue with: stalerl train --resume" in error
    resume(out)
    assert without_timings(read_metrics(out)) == without_timings(read_metrics(reference))
    assert (out / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()


def test_sigterm_checkpoints_at_once_and_a_corrupt_newest_checkpoint_falls_back(small_config, tmp_path,
                                                                                   monkeypatch, capsys):
    train(small(small_config, tmp_path / "reference"))
    run = tmp_path / "run"
    stop_at(monkeypatch, 4)
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM after step 4; checkpoint .*step-000005; continue "
                                          r"with: stalerl train --resume"):
        train(small(small_config, run))
    monkeypatch.undo()
    assert len(read_metrics(run)) == 5
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-000005", "step-000004"]  # keep = 2

    # The newest checkpoint loses its tail (a disk that lied): resume says so and uses the one before.
    model_file = run / "checkpoints" / "step-000005" / "model.safetensors"
    os.truncate(model_file, model_file.stat().st_size // 2)
    capsys.readouterr()
    # resumed with other checkpoint settings (--set checkpoint.every=3 --set checkpoint.keep=1): the same steps
    other_checkpoints = dataclasses.replace(small(small_config, run), checkpoint=CheckpointConfig(3, 1))
    train(other_checkpoints, resume=True)
    warning = capsys.readouterr().err
    assert "step-000005 is unusable: model.safetensors does not match its sha256" in warning
    assert "resuming from step-000004 instead" in warning
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-000009"]  # every 3 from step 4, keep 1
    assert without_timings(read_metrics(run)) == without_timings(read_metrics(tmp_path / "reference"))
    assert (run / "samples.jsonl").read_text() == (tmp_path / "reference" / "samples.jsonl").read_text()


def test_a_process_worker_stops_and_resumes_into_the_thread_workers_run(small_config, tmp_path, monkeypatch):
    """runtime.local_worker=process: the pipeline's snapshot and restart across a SIGTERM, bit for bit.
    The run also keeps its update geometry in host memory (runtime.update_geometry=host), checkpointed
    and restored there: on a CPU model, the same metrics as on the model's device."""
    train(small(small_config, tmp_path / "reference"))
    run = tmp_path / "run"
    config = small(small_config, run, runtime=dataclasses.replace(small_config.runtime, local_worker="process",
                                                                  update_geometry="host"))
    stop_at(monkeypatch, 4)  # the signal reaches the learner's process only; it closes the worker
    with pytest.raises(Interrupted, match="stopped by SIGTERM after step 4"):
        train(config)
    monkeypatch.undo()
    summary = train(config, resume=True)
    assert summary["rollouts"]["worker"] == "process"
    assert without_timings(read_metrics(run)) == without_timings(read_metrics(tmp_path / "reference"))
    assert (run / "samples.jsonl").read_text() == (tmp_path / "reference" / "samples.jsonl").read_text()


def test_resume_refuses_another_config_a_finished_run_and_no_usable_checkpoint(small_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    stop_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(small(small_config, run))
    monkeypatch.undo()
    other = dataclasses.replace(small(small_config, run), optim=dataclasses.replace(small_config.optim, lr=1e-3))
    with pytest.raises(ConfigError, match=r"^--resume .*run: the run was made with another config "
                                          r"\(optim.lr: 0.0001 -> 0.001\)$"):
        train(other, resume=True)
    # config.yaml edited by hand to match: the checkpoint knows what it was made with
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(saved.replace("lr: 0.0001", "lr: 0.001"))
    with pytest.raises(ConfigError, match=r"^--resume .*run: checkpoint step-000003 was made with another config "
                                          r"\(optim.lr: 0.0001 -> 0.001\); was config.yaml edited\?$"):
        train(other, resume=True)
    (run / "config.yaml").write_text(saved)
    (run / "checkpoints" / "step-000003" / "manifest.json").write_text("{")
    (run / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match="no usable checkpoint in .*step-000003 is unusable: manifest.json "
                                          "unreadable .*step-000002 is unusable: state.json does not match"):
        train(small(small_config, run), resume=True)


def test_a_run_with_no_checkpoint_starts_over_and_keeps_what_it_had_logged(small_config, tmp_path, monkeypatch,
                                                                          capsys):
    """Killed before its first checkpoint: --resume starts the run over, and the rows it had logged are moved
    aside, not deleted (a bounded-mode run would not make the same ones again)."""
    train(small(small_config, tmp_path / "reference"))
    run = tmp_path / "run"
    stop_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(small(small_config, run))
    monkeypatch.undo()
    logged = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoints")  # as if killed before the first one was written
    capsys.readouterr()
    train(small(small_config, run), resume=True)
    err = capsys.readouterr().err
    assert "has no checkpoint yet: the run starts over" in err and "the 3 steps it had logged are kept in" in err
    (aside,) = run.glob("before-restart-*")
    assert (aside / "metrics.jsonl").read_text() == logged and (aside / "samples.jsonl").is_file()
    assert without_timings(read_metrics(run)) == without_timings(read_metrics(tmp_path / "reference"))


# ---------------------------------------------------------------- the pipeline alone, stub engines


class StubEngine:
    def __init__(self, version=0):
        self.version = version

    def load_weights(self, state_dict, version):
        self.version = version

    def close(self):
        pass


@dataclasses.dataclass
class StubBatch:
    batch_index: int
    version: int


def run_steps(source, first, last, log):
    for step in range(first, last):
        batch = source.next_batch()
        log.append((batch.batch_index, batch.version))
        time.sleep(random.uniform(0, 0.002))
        source.publish({"w": torch.tensor(step + 1)}, version=step + 1)


@pytest.mark.parametrize("staleness", [0, 1, 3])
@pytest.mark.parametrize("mode", ["exact", "bounded"])
def test_snapshot_then_restart_continues_the_pipeline(mode, staleness):
    steps, stop = 20, 7
    engine = StubEngine()

    def produce(i):
        time.sleep(random.uniform(0, 0.002))
        return StubBatch(i, engine.version)

    log: list[tuple[int, int]] = []
    source = ThreadedRollouts(engine, produce, mode, staleness, total_batches=steps)
    run_steps(source, 0, stop, log)
    state = source.snapshot(version=stop)
    source.close()
    if mode == "exact":  # exactly the batches sampled before theta_stop
        assert [b.batch_index for b in state.batches] == list(range(stop, stop + staleness))
        assert state.next_batch == stop + staleness
    assert state.version == stop
    assert [b.batch_index for b in state.batches] == list(range(stop, state.next_batch))

    engine = StubEngine(version=stop)  # the learner's weights, as train() loads them
    restarted = ThreadedRollouts(engine, produce, mode, staleness, total_batches=steps,
                                 start=PipelineState(state.version, state.next_batch, state.batches))
    run_steps(restarted, stop, steps, log)
    restarted.close()
    assert [index for index, _ in log] == list(range(steps))
    lags = [step - version for step, (_, version) in enumerate(log)]
    if mode == "exact":
        assert lags == [min(step, staleness) for step in range(steps)]
    else:
        assert 0 <= min(lags) and max(lags) <= staleness


def test_sweep_resumes_an_unfinished_cell_from_its_checkpoint(small_config, tmp_path, monkeypatch):
    from stalerl.lab.sweep import cell_configs, run_sweep

    base = small(small_config, tmp_path / "unused")
    (cell, config), = cell_configs(base, tmp_path / "sweep", [2], [3e-4], [5], ["none"])
    train(dataclasses.replace(config, out=str(tmp_path / "reference")))
    stop_at(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train(config)
    monkeypatch.undo()
    # A mark a resume keeps (lines before the checkpoint stay) and a fresh start would overwrite.
    metrics = Path(config.out) / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"lag_max": 0', '"lag_max": 7', 1))

    table = run_sweep([(cell, config)], tmp_path / "sweep", workers=1, progress=False)
    assert table[0]["steps"] == 10
    rows, reference = read_metrics(Path(config.out)), read_metrics(tmp_path / "reference")
    assert rows[0]["lag_max"] == 7
    assert without_timings(rows[1:]) == without_timings(reference[1:])
