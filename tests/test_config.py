import subprocess
import sys

import pytest

from stalerl.cli import main
from stalerl.config import ConfigError, TrainConfig, load_config, override, save_config, validate


def test_defaults_validate_and_round_trip(tmp_path):
    config = validate(TrainConfig(out="x"))
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("key, value, message", [
    ("staleness.staleness", -1, "staleness.staleness: S must be >= 0"),
    ("optim.lr", 0.0, "optim.lr: learning rate must be > 0"),
    ("optim.lr", -1e-3, "optim.lr: learning rate must be > 0"),
    ("rollout.group_size", 1, "rollout.group_size: GRPO needs at least 2"),
    ("staleness.mode", "async", "staleness.mode: 'async' is not one of ['exact', 'bounded']"),
    ("steps", "ten", "steps: expected an integer"),
    ("val_in_background", "sometimes", "val_in_background: 'sometimes' does not match bool | None"),
    ("loss.kl_beta", float("inf"), "loss.kl_beta: must be a finite number, got inf"),  # every float field
    ("stabilizer.k", float("inf"), "stabilizer.k: must be a finite number, got inf"),
    ("task.reward_timeout_s", float("nan"), "task.reward_timeout_s: must be"),
    ("model.hidden_size", 12, "model.hidden_size: hidden_size / num_heads must be even"),  # RoPE, 4 heads
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(override(TrainConfig(), {key: value}))


def test_an_optional_field_takes_null_or_its_type(tmp_path):
    assert override(TrainConfig(), {"val_in_background": None}).val_in_background is None
    path = tmp_path / "c.yaml"
    path.write_text("val_in_background: false\n")
    assert load_config(path).val_in_background is False


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads 1e-6 as a string; a learning rate is written that way more often than not.
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 1e-6\n")
    assert load_config(path).optim.lr == 1e-6
    assert validate(override(TrainConfig(), {"optim.lr": "5e-7"})).optim.lr == 5e-7


def test_is_cap_is_for_the_decoupled_objective():
    with pytest.raises(ConfigError, match="loss.is_cap: is used only with loss.objective=decoupled"):
        validate(override(TrainConfig(), {"loss.is_cap": 2.0}))
    assert validate(override(TrainConfig(), {"loss.is_cap": 2.0, "loss.objective": "decoupled"})).loss.is_cap == 2.0


def test_gac_is_refused_with_lora():
    with pytest.raises(ConfigError, match="stabilizer.gac_cos_threshold: is not available with LoRA"):
        validate(override(TrainConfig(), {"stabilizer.gac_cos_threshold": 0.9, "model.lora_rank": 4}))


def test_a_process_worker_is_for_the_local_runtime_and_the_transformers_engine():
    process = {"runtime.local_worker": "process"}
    with pytest.raises(ConfigError, match=r"^runtime.local_worker: is for the local runtime"):
        validate(override(TrainConfig(), process | {"runtime.runtime": "ray"}))
    with pytest.raises(ConfigError, match=r"^runtime.local_worker: process is for the transformers engine"):
        validate(override(TrainConfig(), process | {"rollout.engine": "vllm", "model.name_or_path": "some/model"}))
    with pytest.raises(ConfigError, match=r"^runtime.local_worker: 'fork' is not one of \['thread', 'process'\]"):
        validate(override(TrainConfig(), {"runtime.local_worker": "fork"}))
    validate(override(TrainConfig(), process))


def test_static_cache_is_for_the_transformers_engine():
    with pytest.raises(ConfigError, match="rollout.static_cache: is for the transformers engine"):
        validate(override(TrainConfig(), {"rollout.engine": "vllm", "rollout.static_cache": True,
                                          "model.name_or_path": "some/checkpoint"}))


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  learning_rate: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.learning_rate'"):
        load_config(path)


def test_yaml_float_forms_are_accepted(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("optim:\n  lr: 0.001\nstaleness:\n  staleness: 4\n  mode: bounded\n")
    config = load_config(path)
    assert config.optim.lr == 0.001 and config.staleness.staleness == 4 and config.staleness.mode == "bounded"


def _cli_error(capsys, argv):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_cli_errors_are_one_line_before_any_work(capsys, tmp_path):
    assert "staleness.staleness" in _cli_error(capsys, ["train", "--staleness", "-1", "--out", str(tmp_path / "a")])
    assert "optim.lr" in _cli_error(capsys, ["train", "--lr", "0", "--out", str(tmp_path / "b")])
    assert "rollout.group_size" in _cli_error(capsys, ["train", "--set", "rollout.group_size=1"])
    assert "unknown key 'loss.epsilon'" in _cli_error(capsys, ["train", "--set", "loss.epsilon=0.1"])
    missing = tmp_path / "nope.yaml"
    assert f"config file not found: {missing}" in _cli_error(capsys, ["train", "--config", str(missing)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_key_given_twice_is_refused_and_an_empty_section_is_empty(tmp_path):
    (tmp_path / "twice.yaml").write_text("steps: 3\noptim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:4: not valid YAML \(key 'lr' is given twice\)"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "empty.yaml").write_text("steps: 3\nmodel:\n  # hidden_size: 64\n")
    assert load_config(tmp_path / "empty.yaml").model == TrainConfig().model


def test_cli_refuses_empty_values_options_of_another_runtime_and_unwritable_outputs(capsys, tmp_path):
    """An unset shell variable (`--resume "$RUN"`) started a fresh default run; a file where --out should
    be gave a traceback after the work."""
    assert "--resume: empty value" in _cli_error(capsys, ["train", "--resume", ""])
    assert "--config: empty value" in _cli_error(capsys, ["sweep", "-S", "0", "--lr", "1e-4", "--out",
                                                          str(tmp_path / "s"), "--config", ""])
    assert "--num-workers: is for --runtime ray" in _cli_error(capsys, ["train", "--num-workers", "3"])
    # a typo's extra zeros took all 24 GB before the kernel killed the run, with no message
    assert "rollout.prompts_per_step: 100000 prompts a step, but the training split has 2244" in _cli_error(
        capsys, ["train", "--set", "rollout.prompts_per_step=100000", "--out", str(tmp_path / "p")])
    assert "--ray-address: is for --runtime ray" in _cli_error(capsys, ["train", "--ray-address", "auto"])
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    for argv in (["train", "--out", str(in_the_way)],
                 ["sweep", "-S", "0", "--lr", "1e-4", "--out", str(in_the_way)],
                 ["bias", "--out", str(in_the_way), "--lr", "1e-4", "--lags", "0,1", "--anchors", "2"],
                 ["bench", "--out", str(in_the_way), "--quick", "--parts", "gen"]):
        assert f"--out {in_the_way}: exists and is not a directory" in _cli_error(capsys, argv)
    assert "cannot write there" in _cli_error(capsys, ["train", "--out", str(in_the_way / "run")])
    assert "--json" in _cli_error(capsys, ["advise", str(tmp_path), "--json", str(tmp_path)])
    assert "--clip-threshold" in _cli_error(capsys, ["advise", str(tmp_path), "--clip-threshold", "nan"])
    for flags, message in ((["--lags", ""], "--lags: no values given"), (["--anchors", "0", "--lags", "0"], "--anchors"),
                           (["--lr", "nan"], "--lr: learning rates must be > 0 and finite")):
        argv = ["bias", "--out", str(tmp_path / "b"), "--lr", "1e-4", "--lags", "0,1", "--anchors", "2", *flags]
        assert message in _cli_error(capsys, argv)
    assert not (tmp_path / "b").exists()


def test_argparses_own_errors_are_one_line_and_negative_lists_reach_their_checks(capsys):
    for argv, message in ((["train", "--steps", "abc"], "argument --steps: invalid int value: 'abc' (see stalerl "
                                                          "train --help)"),
                          (["train", "--bogus"], "unrecognized arguments: --bogus"),
                          (["sweep", "-S", "-1,0", "--lr", "1e-4", "--out", "x"], "S must be >= 0"),
                          (["train", "--lr", "-1e-3"], "optim.lr: learning rate must be > 0")):
        with pytest.raises(SystemExit) as exited:
            code = main(argv)
            raise SystemExit(code)  # a value error is main's return, argparse's an exit
        err = capsys.readouterr().err.strip()
        assert exited.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "stalerl.cli", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--staleness" in result.stdout
