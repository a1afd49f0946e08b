"""Guards: non-finite updates skipped, counted and stopped; collapse stops early; a full disk; bad
input refused in one line (docs/reliability.md lists each message); metrics.jsonl line-atomic."""

import dataclasses
import errno
import itertools
import json
import os
import re

import pytest
from safetensors.torch import load_file

import stalerl.checkpoint as checkpoint_module
import stalerl.learner as learner_module
from stalerl.checkpoint import list_checkpoints, problem_with
from stalerl.cli import main
from stalerl.guards import RunStopped
from stalerl.metrics import MetricsWriter, read_metrics
from stalerl.train import train


def poison_losses(monkeypatch, bad_steps):
    """The GRPO loss becomes NaN at the given learner steps (one loss call a step: no micro-batches)."""
    real, calls = learner_module.grpo_loss, itertools.count()

    def grpo_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan"), stats) if next(calls) in bad_steps else (loss, stats)

    monkeypatch.setattr(learner_module, "grpo_loss", grpo_loss)


def adam_steps(checkpoint_dir):
    return {float(v) for k, v in load_file(str(checkpoint_dir / "optimizer.safetensors")).items() if k.endswith(".step")}


def test_a_non_finite_update_is_skipped_and_counted(small_config, tmp_path, monkeypatch):
    poison_losses(monkeypatch, {3})
    config = dataclasses.replace(small_config, checkpoint=dataclasses.replace(small_config.checkpoint, every=6))
    summary = train(config)
    rows = read_metrics(tmp_path / "run")
    assert [row["skipped_update"] for row in rows] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert rows[3]["update_norm"] == 0.0 and rows[3]["loss"] is None  # weights untouched; NaN is logged as null
    assert summary["skipped_updates"] == 1 and summary["steps"] == 8
    # Adam's state: a checkpoint from before the bad step (3 updates), and after 6 steps only 5 updates.
    assert adam_steps(tmp_path / "run" / "checkpoints" / "step-000003") == {3.0}
    assert adam_steps(tmp_path / "run" / "checkpoints" / "step-000006") == {5.0}


def test_k_non_finite_updates_in_a_row_stop_with_a_checkpoint_from_before(small_config, tmp_path, monkeypatch):
    poison_losses(monkeypatch, {4, 5, 6})
    config = dataclasses.replace(small_config, checkpoint=dataclasses.replace(small_config.checkpoint, every=2))
    with pytest.raises(RunStopped, match=r"^3 non-finite updates in a row \(steps 4-6; first: loss=nan, "
                                         r"grad_norm=nan\), each skipped; stopped \(guard.max_bad_steps=3\). "
                                         r"State from before step 4: checkpoint .*step-000004; continue with"):
        train(config)
    run = tmp_path / "run"
    assert [row["skipped_update"] for row in read_metrics(run)] == [0, 0, 0, 0, 1, 1, 1]
    newest = list_checkpoints(run)[0]  # no periodic checkpoint during the streak (step 6 is skipped)
    assert newest.name == "step-000004" and adam_steps(newest) == {4.0}
    assert not (run / "summary.json").exists()


def test_collapse_can_stop_a_run_early(small_config, tmp_path):
    config = dataclasses.replace(small_config, steps=40, val_every=20,
                                 optim=dataclasses.replace(small_config.optim, lr=0.03),
                                 collapse=dataclasses.replace(small_config.collapse, window=5, min_tail=5,
                                                              stop_early=True))
    summary = train(config)
    assert summary["stopped"] == "collapse"
    assert summary["collapse_step"] is not None and summary["steps"] == summary["collapse_step"] + 5 < 40
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped"] == "collapse"


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(small_config, tmp_path, monkeypatch):
    real, writes = checkpoint_module._write, itertools.count()

    def write(path, data):  # the second checkpoint's first file hits a full disk
        if next(writes) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint_module, "_write", write)
    config = dataclasses.replace(small_config, checkpoint=dataclasses.replace(small_config.checkpoint, every=3))
    with pytest.raises(RunStopped, match=r"^disk full \(No space left on device\) writing .*model.safetensors; "
                                         r"checkpoint .*step-000003; continue with: stalerl train --resume .* once"):
        train(config)
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-000003"]
    assert problem_with(run / "checkpoints" / "step-000003", run) is None
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written one is gone


def test_a_full_disk_for_the_metrics_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    real, writes = MetricsWriter.write, itertools.count()

    def write(self, metrics, samples):  # step 2's line gets half written, then the disk is full
        if next(writes) == 2:
            self.metrics_file.write(b'{"step": 2, "train_')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, metrics, samples)

    monkeypatch.setattr(MetricsWriter, "write", write)
    run = tmp_path / "run"
    argv = ["train", "--steps", "4", "--out", str(run), "--no-progress", "--set", "tensorboard=false",
            "--set", "rollout.prompts_per_step=4", "--set", "task.val_size=64", "--set", "checkpoint.every=1"]
    assert main(argv) == 4
    assert capsys.readouterr().err.strip() == (
        f"stalerl: disk full (No space left on device); checkpoint {run / 'checkpoints' / 'step-000002'}; "
        f"continue with: stalerl train --resume {run} once there is space")
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # the half line is cut off first
    assert [row["step"] for row in read_metrics(run)] == [0, 1, 2, 3]
    assert (run / "metrics.jsonl").read_text().count("\n") == 4


def test_read_metrics_skips_a_truncated_last_line_only(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(3):
        writer.write({"step": step, "loss": float("nan") if step == 1 else 0.5}, {"step": step})
    assert writer.position()["metrics.jsonl"] == (tmp_path / "metrics.jsonl").stat().st_size
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 3, "lo')  # a killed run's half line
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 0.5}, {"step": 1, "loss": None}, {"step": 2, "loss": 0.5}]
    text = (tmp_path / "metrics.jsonl").read_text().replace('"step": 1', '"step": 1,,')
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match="metrics.jsonl:2: malformed metrics line"):
        read_metrics(tmp_path)


BAD_INPUTS = [
    (["--set", "optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
    (["--set", "optim.learning_rate=0.1"], "unknown key 'optim.learning_rate'"),
    (["--set", "checkpoint.every=-1"], "checkpoint.every: must be >= 0 (0: only when stopped by a signal)"),
    (["--set", "guard.max_bad_steps=0"], "guard.max_bad_steps: must be >= 1"),
    (["--data", "data/gsm8k_sample.jsonl"], "task.data: only the math task reads a data file (add --task math)"),
    (["--set", "loss.constant_normalizer=100"], "loss.constant_normalizer: is used only with loss.aggregation=constant"),
    (["--set", "rollout.max_new_tokens=80"], "rollout.max_new_tokens: the longest prompt (7 tokens, '24+19=') plus 80 "
     "new tokens exceeds the model's context of 64 positions; shorten the prompts or lower rollout.max_new_tokens"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), "--no-progress", *extra]) == 2
    assert capsys.readouterr().err == f"stalerl: error: {message}\n"
    assert not (out / "metrics.jsonl").exists()  # refused before any step


def test_bad_config_files_and_resume_targets_are_one_line(tmp_path, capsys):
    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err.strip()

    (tmp_path / "bad.yaml").write_text("optim: {lr: [1, 2]}\n")
    assert error(["train", "--config", str(tmp_path / "bad.yaml")]) == (
        f"stalerl: error: {tmp_path / 'bad.yaml'}: optim.lr: expected float, got [1, 2]")
    (tmp_path / "broken.yaml").write_text("optim: {lr: 1\n")
    assert error(["train", "--config", str(tmp_path / "broken.yaml")]).startswith(
        f"stalerl: error: {tmp_path / 'broken.yaml'}: not valid YAML")
    assert error(["train", "--resume", str(tmp_path)]) == (
        f"stalerl: error: --resume {tmp_path}: not a run directory (no config.yaml)")
    assert error(["train", "--resume", str(tmp_path), "--out", "x"]) == (
        "stalerl: error: --resume RUN goes on in RUN: leave out --out")
    run = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(run), "--no-progress", "--set", "tensorboard=false",
                 "--set", "rollout.prompts_per_step=4", "--set", "task.val_size=64"]) == 0
    capsys.readouterr()
    assert error(["train", "--resume", str(run)]) == (
        f"stalerl: error: --resume {run}: the run is finished (summary.json exists); nothing to resume")
    (run / "summary.json").unlink()
    assert error(["train", "--resume", str(run), "--lr", "0.01", "-S", "4"]) == (
        f"stalerl: error: --resume {run}: the run was made with another config "
        "(optim.lr: 0.0001 -> 0.01, staleness.staleness: 0 -> 4)")


def test_a_dataset_prompt_longer_than_the_context_is_refused(tmp_path, capsys):
    from hf_checkpoint import SAMPLE, save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "model")  # context: 512 positions
    capsys.readouterr()  # transformers' own progress bar from saving it
    argv = ["train", "--model", str(model), "--task", "math", "--data", str(SAMPLE), "--set", "task.val_size=4",
            "--set", "rollout.max_new_tokens=500", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert re.match(r"stalerl: error: rollout.max_new_tokens: the longest prompt \(\d+ tokens, .*\) plus 500 new "
                    r"tokens exceeds the model's context of 512 positions", capsys.readouterr().err)
