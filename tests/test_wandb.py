"""Weights & Biases logging (wandb_logging.py), offline: what reached W&B's own log, read back."""

import dataclasses
import importlib.util
import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from processes import children_of
from test_checkpoint import small, stop_at, without_timings

import stalerl.train as train_module
from stalerl.checkpoint import config_difference
from stalerl.cli import main
from stalerl.config import ConfigError, WandbConfig, load_config, validate
from stalerl.guards import Interrupted
from stalerl.lab.sweep import cell_configs
from stalerl.metrics import read_metrics
from stalerl.train import train
from stalerl.wandb_logging import RUN_ID_FILE

pytest.importorskip("wandb")
from wandb_records import offline_runs, read_run  # noqa: E402 (reads W&B's own log: needs wandb)

OFFLINE = WandbConfig(project="stalerl-tests", mode="offline")


@pytest.fixture(autouse=True)
def no_wandb_account(tmp_path, monkeypatch):
    """No W&B settings or key of the machine's user reach a test."""
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)


def history_of(rows, key):
    return {row["step"]: row[key] for row in rows if row[key] is not None}


def test_a_run_sends_each_steps_metrics_its_config_and_its_summary(small_config, tmp_path):
    config = dataclasses.replace(small_config, wandb=OFFLINE)
    summary = train(config)
    run_dir = Path(config.out)
    [log] = offline_runs(run_dir)
    sent = read_run(log)
    rows = read_metrics(run_dir)

    assert sent["id"] == (run_dir / RUN_ID_FILE).read_text().strip()
    assert (sent["project"], sent["name"], sent["group"]) == ("stalerl-tests", "run", "")
    assert sorted(sent["history"]) == list(range(config.steps))  # W&B step = learner step
    for key in ("train_reward", "grad_cos_sim", "drift", "lag_max", "gen_s"):
        assert {step: values[key] for step, values in sent["history"].items() if key in values} == history_of(rows, key)
    assert {step for step, values in sent["history"].items() if "val_reward" in values} == {3, 7}  # val_every = 4
    assert sent["config"]["staleness"]["staleness"] == config.staleness.staleness
    assert sent["config"]["wandb"]["project"] == "stalerl-tests"
    assert sent["summary"]["final_val_reward"] == summary["final_val_reward"]
    assert sent["summary"]["initial_val_reward"] == summary["initial_val_reward"]
    assert sent["summary"]["collapse_step"] is None and sent["exit_code"] == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == config.steps

    train(dataclasses.replace(small_config, out=str(tmp_path / "without")))  # W&B changes no step
    assert without_timings(read_metrics(tmp_path / "without")) == without_timings(rows)


def test_resume_goes_on_in_the_same_wandb_run_from_the_checkpoint(small_config, tmp_path, monkeypatch):
    config = dataclasses.replace(small(small_config, tmp_path / "run"), wandb=OFFLINE)
    stop_at(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train(config)
    monkeypatch.undo()
    stopped = read_run(offline_runs(config.out)[0])
    assert sorted(stopped["history"]) == list(range(5)) and stopped["exit_code"] == 130
    assert stopped["summary"]["stopped_by"].startswith("stopped by SIGTERM after step 4")

    train(config, resume=True)
    first, resumed = (read_run(path) for path in offline_runs(config.out))
    assert resumed["id"] == first["id"] and resumed["exit_code"] == 0
    assert sorted(resumed["history"]) == list(range(5, 10))  # the checkpoint was at step 5
    sent = {step: values["train_reward"] for run in (first, resumed) for step, values in run["history"].items()}
    assert sent == history_of(read_metrics(config.out), "train_reward")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds W&B's service in /proc (Linux)")
def test_a_wandb_service_that_dies_stops_the_logging_not_the_run(small_config, tmp_path, monkeypatch, capsys):
    real, calls = train_module.learner_step, []

    def learner_step(*args, **kwargs):  # kills W&B's service process (wandb-core) during step 3
        calls.append(1)
        if len(calls) == 4:
            for pid in children_of(os.getpid()):
                if "wandb-core" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "learner_step", learner_step)
    config = dataclasses.replace(small_config, wandb=OFFLINE)
    summary = train(config)
    assert summary["steps"] == config.steps and (Path(config.out) / "summary.json").is_file()
    assert len(read_metrics(config.out)) == config.steps
    assert capsys.readouterr().err.count("stalerl: W&B logging stopped (") == 1


def test_wandb_settings_are_checked_before_work_and_do_not_bind_a_resume(small_config, monkeypatch, capsys):
    logged = dataclasses.replace(small_config, wandb=WandbConfig(project="p", mode="offline"))
    assert config_difference(small_config, logged) == ""  # --resume may turn W&B on or off

    find_spec = importlib.util.find_spec
    with monkeypatch.context() as patch:  # only this: the fixture's W&B settings stay
        patch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "wandb" else find_spec(name, *args))
        with pytest.raises(ConfigError, match=r"wandb.project: W&B logging needs wandb, which is not installed "
                                              r"\(pip install 'stalerl\[wandb\]'\)"):
            validate(logged)

    assert main(["train", "--set", "wandb.mode=cloud", "--out", str(Path(small_config.out).parent / "x")]) == 2
    assert "stalerl: error: wandb.mode: 'cloud' is not one of ['online', 'offline']" in capsys.readouterr().err

    # Online with no API key: one line, before the model loads, and nothing but the config written.
    out = Path(small_config.out).parent / "online"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal: W&B cannot ask for a key
    code = main(["train", "--wandb", "p", "--steps", "2", "--out", str(out), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2
    assert "stalerl: error: wandb.project: W&B could not start a run in 'p' (" in error
    assert "--set wandb.mode=offline logs with no server" in error
    assert not (out / "metrics.jsonl").exists()


def test_a_sweeps_cells_and_the_sweep_itself_are_wandb_runs_in_one_group(small_config, tmp_path):
    base = dataclasses.replace(small_config, wandb=OFFLINE)
    cells = cell_configs(base, tmp_path / "sweep-a", [0, 2], [1e-4], [0], ["none"])
    assert [(config.wandb.group, config.wandb.name) for _, config in cells] == [
        ("sweep-a", "S0-lr0.0001-seed0"), ("sweep-a", "S2-lr0.0001-seed0")]
    named = dataclasses.replace(base, wandb=dataclasses.replace(OFFLINE, group="mine", name="mine"))
    assert {config.wandb.name for _, config in cell_configs(named, tmp_path / "b", [0, 2], [1e-4], [0], ["none"])} == {
        "S0-lr0.0001-seed0", "S2-lr0.0001-seed0"}  # a name for the sweep does not name every cell
    assert {config.wandb.group for _, config in cell_configs(small_config, tmp_path / "c", [0], [1e-4], [0], ["none"])} == {""}

    out = tmp_path / "sweep-a"
    argv = ["sweep", "-S", "0,2", "--lr", "1e-4", "--steps", "3", "--workers", "2", "--out", str(out), "--no-progress",
            "--wandb", "stalerl-tests", "--set", "wandb.mode=offline", "--set", "rollout.prompts_per_step=4",
            "--set", "task.val_size=32", "--set", "val_every=3"]
    assert main(argv) == 0
    table = json.loads((out / "sweep.json").read_text())
    for row in table:
        [log] = offline_runs(out / row["run_dir"])
        sent = read_run(log)
        assert (sent["name"], sent["group"], sorted(sent["history"])) == (row["run_dir"], "sweep-a", [0, 1, 2])
        assert sent["summary"]["final_val_reward"] == row["final_val_reward"]
        assert load_config(out / row["run_dir"] / "config.yaml").val_in_background is False  # the cores are busy
    [log] = offline_runs(out)
    sweep = read_run(log)
    assert (sweep["name"], sweep["group"], sweep["exit_code"]) == ("sweep-a", "sweep-a", 0)
    [logged] = sweep["history"].values()
    assert logged["sweep"]["_type"] == "table-file" and logged["sweep"]["nrows"] == 2
    assert {key for key, value in logged.items() if value.get("_type") == "image-file"} == {
        f"figures/{path.stem}" for path in out.glob("*.png")} != set()
    assert sweep["summary"]["cells"] == 2
