"""`stalerl bias` end to end on the tiny model, shortened: the report, the figure, growing a probe."""

import dataclasses
import json
import math

import pytest

from stalerl.cli import main


def test_bias_probe_end_to_end(tmp_path, capsys):
    out = tmp_path / "bias"
    common = ["bias", "--anchors", "2", "--lags", "0,1,2", "--batches", "3", "--out", str(out),
              "--set", "rollout.prompts_per_step=4", "--set", "rollout.group_size=4"]
    assert main(common + ["--lr", "1e-3"]) == 0
    report = json.loads((out / "bias.json").read_text())
    points = {(p["lr"], p["lag"]): p for p in report["points"]}
    assert set(points) == {(1e-3, 0), (1e-3, 1), (1e-3, 2)}
    assert points[(1e-3, 0)]["bias_sq"] == 0.0 and points[(1e-3, 0)]["drift"] == 0.0
    assert points[(1e-3, 0)]["flipped_frac"] == 0.0 and points[(1e-3, 0)]["d_norm_max"] == 0.0
    for lag in (1, 2):  # the stale batches differ from the fresh ones in the samples that flipped
        point = points[(1e-3, lag)]
        assert 0 <= point["flipped_frac"] <= 1 and 0 <= point["d_norm_median"] <= point["d_norm_max"]
    for lag in (1, 2):
        point = points[(1e-3, lag)]
        assert point["drift"] > 0 and point["naive_norm"] >= 0 and point["bias_sq_se"] >= 0
        assert point["bias_low"] <= point["bias_norm"] <= point["bias_high"]
    assert points[(1e-3, 2)]["drift"] > points[(1e-3, 1)]["drift"]  # two steps move further than one
    assert (out / "bias.png").stat().st_size > 10_000
    assert main(common + ["--lr", "3e-4", "--lags", "1"]) == 0  # grows the same probe
    grown = json.loads((out / "bias.json").read_text())
    assert {(p["lr"], p["lag"]) for p in grown["points"]} == set(points) | {(3e-4, 1)}
    assert "S exponent" in capsys.readouterr().out
    assert grown["fits"]["method"] != grown["fits_log_log"]["method"]  # both fits, each saying how it was made
    json.loads((out / "bias.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} written"))
    assert main(["bias", "--refit", "--out", str(out)]) == 0
    assert json.loads((out / "bias.json").read_text()) == grown
    assert main(common + ["--lr", "3e-4", "--lags", "1", "--set", "loss.objective=decoupled"]) == 2
    assert ("holds a probe of another config (loss.objective: 'clipped' -> 'decoupled'); its points would be "
            "fitted with these") in capsys.readouterr().err
    assert json.loads((out / "bias.json").read_text()) == grown  # kept as it was
    # settings the probe does not read do not make another probe
    assert main(common + ["--lr", "3e-4", "--lags", "1", "--set", "staleness.staleness=4", "--set", "val_every=7"]) == 0


def test_bias_probe_refuses_bad_settings(tmp_path, capsys):
    assert main(["bias", "--anchors", "4", "--lags", "1,8", "--out", str(tmp_path / "b")]) == 2
    assert "--anchors" in capsys.readouterr().err
    assert main(["bias", "--batches", "2", "--out", str(tmp_path / "b")]) == 2
    assert "--batches" in capsys.readouterr().err


def test_bias_probe_refuses_a_model_it_cannot_build(tmp_path, capsys):
    """The probe measured the embedded tiny model on addition whatever model and task were asked for."""
    import torch
    from hf_checkpoint import SAMPLE

    out = tmp_path / "b"
    common = ["bias", "--anchors", "1", "--lags", "1", "--batches", "3", "--lr", "1e-3", "--out", str(out)]
    math = ["--set", f"model.name_or_path={tmp_path / 'missing'}", "--set", "task.name=math",
            "--set", "task.val_size=4"]
    assert main(common + math + ["--set", f"task.data={tmp_path / 'missing.jsonl'}"]) == 2  # data first: no model read
    assert capsys.readouterr().err == f"stalerl: error: task.data: file not found: {tmp_path / 'missing.jsonl'}\n"
    assert main(common + math + ["--set", f"task.data={SAMPLE}"]) == 2
    missing = tmp_path / "missing"
    assert capsys.readouterr().err == f"stalerl: error: model.name_or_path: directory not found: {missing}\n"
    if not torch.cuda.is_available():
        assert main(common + ["--set", "model.device=cuda"]) == 2
        assert "model.device: cuda asked for but no CUDA GPU is visible" in capsys.readouterr().err
    assert not out.exists()


def test_bias_probe_measures_the_configured_model_and_task(tmp_path, capsys):
    from hf_checkpoint import SAMPLE, save_tiny_checkpoint

    from stalerl.model import count_parameters
    from transformers import AutoModelForCausalLM

    model = save_tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "bias"
    argv = ["bias", "--anchors", "1", "--lags", "0,1", "--batches", "3", "--lr", "1e-3", "--out", str(out),
            "--set", f"model.name_or_path={model}", "--set", "task.name=math", "--set", f"task.data={SAMPLE}",
            "--set", "task.val_size=4", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2",
            "--set", "rollout.max_new_tokens=4"]
    assert main(argv) == 0
    report = json.loads((out / "bias.json").read_text())
    settings = report["settings"]
    assert settings["model"] == str(model) and settings["task"] == "math" and settings["device"] == "cpu"
    assert settings["parameters"] == count_parameters(AutoModelForCausalLM.from_pretrained(model))
    assert {p["lag"] for p in report["points"]} == {0, 1}
    capsys.readouterr()
    assert main(["bias", "--anchors", "1", "--lags", "1", "--batches", "3", "--out", str(out)]) == 2  # other model
    assert "holds a probe of model" in capsys.readouterr().err


def test_bias_json_is_strict_json_and_reads_its_nulls_back_as_nan(tmp_path):
    from stalerl.lab.advice import write_report
    from stalerl.lab.bias import BiasPoint, read_points, refit

    fields = dict(lr=1e-3, anchor=8, lag=2, bias_sq=4e-4, bias_sq_se=1e-4, bias_norm=0.02, bias_low=0.0,
                  bias_high=0.03, noise_floor=0.014, below_floor=False, naive_norm=0.05, drift=0.1, batches=3)
    points = [BiasPoint(**fields), BiasPoint(**fields | {"lag": 4, "bias_high": math.nan, "drift": 0.2})]
    report = {"points": [dataclasses.asdict(p) for p in points], "fits": {"slope_low": math.nan}}
    write_report(report, tmp_path / "bias.json")
    text = (tmp_path / "bias.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written"))
    assert strict["fits"]["slope_low"] is None and strict["points"][1]["bias_high"] is None
    again = read_points(tmp_path / "bias.json")
    assert math.isnan(again[1].bias_high) and again[0] == points[0]
    refit(tmp_path)  # the fits and the figure from the file as written
    assert (tmp_path / "bias.png").is_file()
