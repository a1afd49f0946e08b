"""A small end-to-end sweep: cells, resumption, the table, figures and advice read from it."""

import json

from stalerl.cli import main


def test_sweep_resume_figures_and_advice(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--staleness", "0,2", "--lr", "1e-4,0.05", "--steps", "12", "--out", str(out), "--workers", "2",
            "--no-progress", "--set", "val_every=6", "--set", "rollout.prompts_per_step=4",
            "--set", "collapse.window=3", "--set", "collapse.min_tail=3"]
    assert main(argv) == 0
    table = json.loads((out / "sweep.json").read_text())
    assert {(row["S"], row["lr"]) for row in table} == {(0, 1e-4), (0, 0.05), (2, 1e-4), (2, 0.05)}
    for row in table:
        assert row["steps"] == 12 and row["g_upd"] > 0
        assert (out / row["run_dir"] / "summary.json").is_file()
    assert any(row["collapse_step"] is not None for row in table if row["lr"] == 0.05)
    for name in ("sweep.png", "per_s.png", "collapse.png"):
        assert (out / name).stat().st_size > 10_000
    capsys.readouterr()

    # Resuming: finished cells are not rerun; a half-written cell is redone.
    first_wall = {row["run_dir"]: row["wall_s"] for row in table}
    (out / "S2-lr0.0001-seed0" / "summary.json").unlink()
    assert main(argv + ["--no-figures"]) == 0
    again = {row["run_dir"]: row["wall_s"] for row in json.loads((out / "sweep.json").read_text())}
    assert again["S0-lr0.0001-seed0"] == first_wall["S0-lr0.0001-seed0"]
    assert again["S2-lr0.0001-seed0"] != first_wall["S2-lr0.0001-seed0"]
    capsys.readouterr()

    assert main(["advise", str(out), "--staleness", "0,2", "--steps", "12", "--json", str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    assert "G_upd" in printed and "R_crit" in printed and "S=2, T=12" in printed
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["g_upd"]["count"] == 4 and len(report["advice"]) == 2


def test_sweep_and_advise_refuse_bad_input(tmp_path, capsys):
    assert main(["sweep", "--staleness", "0", "--lr", "1e-3", "--out", str(tmp_path / "s"),
                 "--stabilizers", "magic"]) == 2
    assert "unknown 'magic'" in capsys.readouterr().err
    assert main(["sweep", "--staleness", "-1", "--lr", "1e-3", "--out", str(tmp_path / "s")]) == 2
    assert "staleness.staleness" in capsys.readouterr().err
    assert main(["advise", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["advise", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["advise", str(tmp_path), "--staleness", "-1"]) == 2
    assert "--staleness" in capsys.readouterr().err


def test_figures_of_a_sweep_with_stabilizer_runs_only(tmp_path, monkeypatch):
    """`stalerl sweep --stabilizers staleness` has no fixed-lr cells: only the stabilizer figure is drawn."""
    from stalerl.lab import plots
    from stalerl.lab.runs import RunRecord

    def run(staleness, stabilizer):
        metrics = [{"step": t, "train_reward": 0.3, "grad_cos_sim": 0.9, "val_reward": 0.3 if t % 5 == 0 else None}
                   for t in range(20)]
        config = {"staleness": {"staleness": staleness}, "optim": {"lr": 1e-3}, "seed": 0,
                  "stabilizer": {"lr_control": stabilizer}}
        return RunRecord(tmp_path, config, {"collapse_step": None, "steps": 20}, metrics)

    monkeypatch.setattr(plots, "load_runs", lambda directory: [run(4, "staleness"), run(16, "staleness")])
    assert plots.sweep_figures(tmp_path) == [tmp_path / "stabilizers.png"]
    assert (tmp_path / "stabilizers.png").stat().st_size > 10_000
    monkeypatch.setattr(plots, "load_runs", lambda directory: [run(4, "none"), run(4, "staleness")])
    assert {path.name for path in plots.sweep_figures(tmp_path)} == {"sweep.png", "per_s.png", "collapse.png",
                                                                     "stabilizers.png"}
