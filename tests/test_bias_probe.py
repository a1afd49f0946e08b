"""`stalerl bias` end to end on the tiny model, shortened: the report, the figure, growing a probe."""

import json

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


def test_bias_probe_refuses_bad_settings(tmp_path, capsys):
    assert main(["bias", "--anchors", "4", "--lags", "1,8", "--out", str(tmp_path / "b")]) == 2
    assert "--anchors" in capsys.readouterr().err
    assert main(["bias", "--batches", "2", "--out", str(tmp_path / "b")]) == 2
    assert "--batches" in capsys.readouterr().err
