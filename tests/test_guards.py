"""Guards: non-finite updates skipped, counted and stopped; collapse stops early; a full disk; bad
input refused in one line (docs/reliability.md lists each message); metrics.jsonl line-atomic."""

import dataclasses
import errno
import itertools
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stalerl.checkpoint as checkpoint_module
import stalerl.learner as learner_module
import stalerl.policy as policy_module
from stalerl.checkpoint import list_checkpoints, problem_with
from stalerl.cli import main
from stalerl.config import ConfigError, ModelConfig, TrainConfig, override, parse_assignment, validate
from stalerl.guards import RunStopped
from stalerl.metrics import MetricsWriter, read_metrics
from stalerl.policy import build_policy, load_pretrained
from stalerl.preflight import check_hardware
from stalerl.train import train
from stalerl.warmstart import warm_start_key, warm_started_policy


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


def test_a_full_disk_when_saving_the_final_policy_is_one_line(tmp_path, capsys, monkeypatch):
    def save_final(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "final" / "model.safetensors"))

    monkeypatch.setattr("stalerl.train.save_final", save_final)
    run = tmp_path / "run"
    argv = ["train", "--steps", "2", "--out", str(run), "--no-progress", "--set", "tensorboard=false",
            "--set", "rollout.prompts_per_step=4", "--set", "task.val_size=64", "--set", "checkpoint.every=1"]
    assert main(argv) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("stalerl: disk full (No space left on device) writing ") and "\n" not in err
    assert f"stalerl train --resume {run}" in err and not (run / "summary.json").exists()


def test_safetensors_own_disk_full_error_reads_as_the_os_error_and_the_half_checkpoint_goes(tmp_path, monkeypatch):
    """save_pretrained writes through safetensors' save_file, whose SafetensorError carries the OS's code in
    its text; save_final raises it as that OSError (so the run says "disk full") and removes final/."""
    from safetensors import SafetensorError

    from stalerl.config import TrainConfig
    from stalerl.policy import build_policy, save_final

    model, tokenizer, _ = build_policy(TrainConfig())

    def full_disk(path, **kwargs):
        Path(path, "config.json").write_text("{}")  # what transformers wrote before the weights
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    final = tmp_path / "final"
    final.mkdir()
    with pytest.raises(OSError) as raised:
        save_final(model, tokenizer, final, lora=False)
    assert raised.value.errno == errno.ENOSPC and raised.value.strerror == os.strerror(errno.ENOSPC)
    assert raised.value.filename == str(final) and not final.exists()


def test_a_users_config_yaml_in_the_run_directory_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "exp1"
    run.mkdir()
    mine = "# my experiment: lr from the grid search\noptim:\n  lr: 3.0e-4\nsteps: 2\n"
    (run / "config.yaml").write_text(mine)
    argv = ["train", "--config", str(run / "config.yaml"), "--out", str(run), "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"stalerl: error: run directory {run} holds a config.yaml that stalerl did not write, and a run writes "
        f"its own there; choose another --out")
    assert (run / "config.yaml").read_text() == mine


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
    # --set values that are not YAML, and values validate() used to let through (or crash on)
    (["--set", "optim.lr=[1"], "optim.lr: '[1' is not a valid value (while parsing a flow sequence; expected ',' "
     "or ']', but got '<stream end>')"),
    (["--set", "model.num_heads=0"], "model.num_heads: must be >= 1"),
    (["--set", "model.num_layers=0"], "model.num_layers: must be >= 1"),
    (["--seed", "-1"], "seed: must be in [0, 2**32 - 1] (numpy's seed range)"),
    (["--seed", str(2**32)], "seed: must be in [0, 2**32 - 1] (numpy's seed range)"),
    (["--set", "warm_start.seed=-1"], "warm_start.seed: must be in [0, 2**32 - 1] (numpy's seed range)"),
    (["--set", "warm_start.batch_size=0"], "warm_start.batch_size: must be >= 1"),
    (["--set", "optim.weight_decay=-0.1"], "optim.weight_decay: must be >= 0 and finite"),
    (["--set", "optim.weight_decay=.nan"], "optim.weight_decay: must be >= 0 and finite"),
    (["--set", "optim.lr=.inf"], "optim.lr: learning rate must be > 0 and finite"),
    (["--set", "collapse.threshold=.nan"], "collapse.threshold: must be a finite number"),
    (["--set", "rollout.temperature=.inf"], "rollout.temperature: must be > 0 and finite"),
    (["--set", "model.lora_dropout=1"], "model.lora_dropout: must be in [0, 1)"),
    (["--set", "model.device=gpu"], "model.device: 'gpu' is not auto, cpu, cuda, cuda:N or mps"),
    (["--lr", "-1e-3"], "optim.lr: learning rate must be > 0 and finite"),  # argparse took it for an option
    (["--set", "runtime.rollout_cuda_stream=own", "--set", "runtime.local_worker=process"],
     "runtime.rollout_cuda_stream: own is for the local runtime's rollout thread (a worker process has a CUDA "
     "context of its own)"),
    (["--set", "runtime.rollout_cuda_stream=own"],  # checked on this machine: the embedded default runs on CPU
     "runtime.rollout_cuda_stream: own needs the model on a CUDA GPU (model.device auto runs it on cpu here)"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), "--no-progress", *extra]) == 2
    assert capsys.readouterr().err == f"stalerl: error: {message}\n"
    assert not out.exists()  # refused before any step, and nothing left behind


def test_a_refused_run_leaves_its_directory_as_it_found_it(tmp_path, capsys, monkeypatch):
    too_long = ["--set", "rollout.max_new_tokens=80"]  # refused once the model is built, after the directory
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "2", "--no-progress", *too_long]) == 2  # the default runs/train-DATE
    assert list((tmp_path / "runs").iterdir()) == []
    out = tmp_path / "mine"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "notes.txt").write_text("the user's\n")
    assert main(["train", "--steps", "2", "--out", str(out), "--no-progress", *too_long]) == 2
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*")) == ["tensorboard", "tensorboard/notes.txt"]
    capsys.readouterr()
    assert main(["train", "--steps", "2", "--out", str(out), "--no-progress"]) == 0  # the same command, fixed
    assert (out / "summary.json").is_file() and (out / "tensorboard" / "notes.txt").is_file()


def test_sigterm_before_a_run_takes_the_signals_is_one_line_and_keeps_nothing_half_made(tmp_path, capsys, monkeypatch):
    """SIGTERM while the command imports or builds the policy used to kill it silently (exit 143),
    leaving a run directory that looked like a run; now it unwinds as Ctrl-C does."""
    import signal

    import stalerl.cli as cli_module
    import stalerl.validation as validation_module

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli_module, "run_train", lambda args: os.kill(os.getpid(), signal.SIGTERM))  # "importing"
    assert main(["train", "--steps", "2", "--no-progress"]) == 130
    assert capsys.readouterr().err == "stalerl: terminated (SIGTERM); what is written stays\n"
    assert signal.getsignal(signal.SIGTERM) is before  # main() in process leaves the handler as it found it
    monkeypatch.undo()

    def signalled(self, version):  # theta_0's validation: after the run directory, before the loop
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(validation_module.Validation, "score_now", signalled)
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err == ("stalerl: stopped by SIGTERM before the first step; nothing was kept: "
                                       "the same command starts the run again\n")
    assert not out.exists()  # as a refused run: the same command is not refused for "already holds a run"


def test_bad_config_files_and_resume_targets_are_one_line(tmp_path, capsys):
    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err.strip()

    (tmp_path / "bad.yaml").write_text("optim: {lr: [1, 2]}\n")
    assert error(["train", "--config", str(tmp_path / "bad.yaml")]) == (
        f"stalerl: error: {tmp_path / 'bad.yaml'}: optim.lr: expected float, got [1, 2]")
    (tmp_path / "broken.yaml").write_text("steps: 3\noptim: {lr: 1\n")
    assert error(["train", "--config", str(tmp_path / "broken.yaml")]) == (
        f"stalerl: error: {tmp_path / 'broken.yaml'}:2: not valid YAML (while parsing a flow mapping; expected ',' "
        "or '}', but got '<stream end>')")
    (tmp_path / "binary.yaml").write_bytes(b"steps: 3\n\xff\xfe\n")
    assert error(["train", "--config", str(tmp_path / "binary.yaml")]) == (
        f"stalerl: error: {tmp_path / 'binary.yaml'}: not UTF-8 text (byte 0xff at offset 9); a config file is "
        "YAML text")
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


# ---------------------------------------------------------------- text on the command line, models, the cache


@pytest.mark.parametrize("value, template", [
    ("{question} A:", "{question} A:"),  # not YAML at all
    ("{question}", "{question}"),  # YAML would read a mapping
    ("Answer #1: {question}", "Answer #1: {question}"),  # YAML would cut a comment off
    ('"  {question}"', "  {question}"),  # YAML quotes still work
])
def test_set_takes_text_fields_as_typed(value, template):
    key, parsed = parse_assignment(f"task.prompt_template={value}")
    assert validate(override(TrainConfig(), {key: parsed})).task.prompt_template == template


def test_an_unknown_key_is_named_even_when_its_value_is_not_yaml():
    with pytest.raises(ConfigError, match=r"^unknown key 'optim.learning_rate'"):
        override(TrainConfig(), dict([parse_assignment("optim.learning_rate=[1")]))


def test_a_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = override(TrainConfig(), {"model.device": "cuda:2"})
    with pytest.raises(ConfigError, match=r"^model.device: cuda:2 asked for but 2 CUDA GPU\(s\) are visible"):
        check_hardware(config)


@pytest.mark.parametrize("setting, why", [
    ({"rollout.engine": "vllm", "model.name_or_path": "ckpt"}, "own is for the transformers engine"),
    ({"runtime.runtime": "ray"}, "own is for the local runtime's rollout thread"),
])
def test_an_own_rollout_stream_is_only_for_the_transformers_thread(setting, why):
    with pytest.raises(ConfigError, match=f"^runtime.rollout_cuda_stream: {why}"):
        validate(override(TrainConfig(), {"runtime.rollout_cuda_stream": "own", **setting}))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from hf_checkpoint import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("targets, message", [
    ("q_prj", "model.lora_target_modules: 'q_prj' matches no module of the model (its linear layers: down_proj, "
              "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj; or all-linear)"),
    ("q_proj,vproj", "model.lora_target_modules: 'vproj' matches no module of the model"),
])
def test_unknown_lora_targets_are_one_line(tiny_checkpoint, targets, message):
    pytest.importorskip("peft")
    config = override(TrainConfig(), {"model.name_or_path": str(tiny_checkpoint), "model.lora_rank": 2,
                                      "model.lora_target_modules": targets})
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build_policy(config)


def test_a_mistyped_local_path_fails_fast_without_a_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(policy_module, "hub_unreachable", lambda: "huggingface.co cannot be reached: test")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="^" + re.escape(
            "model.name_or_path: ckpts/my-llama is neither a local directory nor loadable from the Hugging Face hub "
            "(huggingface.co cannot be reached: test, and it is not in the local hub cache)")):
        load_pretrained(ModelConfig(name_or_path="ckpts/my-llama"))
    assert time.perf_counter() - start < 10  # not huggingface_hub's ~50 s of retries
    with pytest.raises(ConfigError, match="^model.name_or_path: directory not found: runs/a/final$"):
        load_pretrained(ModelConfig(name_or_path="runs/a/final"))  # two separators: never a hub name


TINY_WARM_START = {"model.hidden_size": 16, "model.intermediate_size": 32, "model.num_layers": 1, "model.num_heads": 2,
                   "task.max_operand": 9, "task.val_size": 8, "warm_start.steps": 2, "warm_start.batch_size": 4}


def test_a_missing_warm_start_is_built_once_while_the_others_that_need_it_wait(tmp_path, monkeypatch):
    """A sweep's cells or Ray's actors starting at once on an empty cache: one builds, the rest load it."""
    import concurrent.futures

    import stalerl.warmstart as warmstart

    monkeypatch.setenv("STALERL_CACHE", str(tmp_path / "cache"))
    config = override(TrainConfig(), TINY_WARM_START)
    builds, build = [], warmstart._build

    def slow_build(*args):
        builds.append(1)
        time.sleep(0.5)  # long enough for the others to find the entry missing and wait
        build(*args)

    monkeypatch.setattr(warmstart, "_build", slow_build)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        policies = list(pool.map(lambda _: warm_started_policy(config), range(3)))
    assert len(builds) == 1
    first = policies[0][0].state_dict()
    assert all(torch.equal(first[name], tensor)
               for model, _, _ in policies[1:] for name, tensor in model.state_dict().items())


def test_a_damaged_warm_start_cache_entry_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STALERL_CACHE", str(tmp_path / "cache"))  # not the session's cache other tests use
    config = override(TrainConfig(), TINY_WARM_START)
    model, _, record = warm_started_policy(config)
    built = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    del model  # its weights may be memory-mapped from the file cut below
    weights = tmp_path / "cache" / f"warmstart-{warm_start_key(config)}" / "model.safetensors"
    cut = weights.with_suffix(".cut")
    cut.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    os.replace(cut, weights)  # a truncated file (a copy or a disk that ran out)
    capsys.readouterr()
    rebuilt, _, again = warm_started_policy(config)
    err = capsys.readouterr().err
    assert f"stalerl: warning: warm-start cache entry {weights.parent} is unusable (SafetensorError" in err
    assert again == record and all(torch.equal(built[name], tensor) for name, tensor in rebuilt.state_dict().items())
    assert warm_started_policy(config)[2] == record and "warning" not in capsys.readouterr().err  # cached again


def test_loading_the_policy_leaves_transformers_progress_bars_as_the_caller_had_them():
    """The bench's TRL run turns them off; the warm start used to turn them back on behind it, so
    every TRL run printed its shard bars into the bench's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        warm_started_policy(TrainConfig())
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
    warm_started_policy(TrainConfig())
    assert hf_logging.is_progress_bar_enabled()  # on as the caller had them
