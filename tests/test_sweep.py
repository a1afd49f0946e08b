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

    assert main(["advise", str(out), "--staleness", "0,2", "--steps", "12", "--json", str(tmp_path / "new" / "a.json")]) == 0
    printed = capsys.readouterr().out
    assert "G_upd" in printed and "R_crit" in printed and "S=2, T=12" in printed
    def no_nan(constant):  # strict JSON: NaN (an undetermined interval) is written as null
        raise AssertionError(f"{constant} in advise's JSON")

    report = json.loads((tmp_path / "new" / "a.json").read_text(), parse_constant=no_nan)
    assert report["g_upd"]["count"] == 4 and len(report["advice"]) == 2


def test_sweep_and_advise_refuse_bad_input(tmp_path, capsys):
    assert main(["sweep", "--staleness", "0", "--lr", "1e-3", "--out", str(tmp_path / "s"),
                 "--stabilizers", "magic"]) == 2
    assert "unknown 'magic'" in capsys.readouterr().err
    assert main(["sweep", "--staleness", "-1", "--lr", "1e-3", "--out", str(tmp_path / "s")]) == 2
    assert "staleness.staleness" in capsys.readouterr().err
    assert main(["sweep", "--staleness", "0,2", "--lr", "1e-3", "--out", str(tmp_path / "s"), "--set", "task.name=math",
                 "--set", f"task.data={tmp_path / 'missing.jsonl'}", "--set", "model.name_or_path=some/model"]) == 2
    assert "task.data: file not found" in capsys.readouterr().err  # from the sweep, before any worker starts
    assert not any((tmp_path / "s").glob("S*"))
    assert main(["sweep", "--staleness", "0", "--lr", "", "--out", str(tmp_path / "s")]) == 2
    assert "--lr: no values given" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    run = tmp_path / "run"  # `stalerl train --out run` made this; a sweep inside it would be read as that run
    run.mkdir()
    (run / "config.yaml").write_text("# stalerl run config\n")
    assert main(["sweep", "--staleness", "0", "--lr", "1e-3", "--out", str(run)]) == 2
    assert "holds a training run (config.yaml), not a sweep" in capsys.readouterr().err
    assert sorted(path.name for path in run.iterdir()) == ["config.yaml"]
    assert main(["sweep", "-S", "0", "--lr", "1e-3", "--out", str(tmp_path / "s"), "--runtime", "ray",
                 "--ray-address", "127.0.0.1:1"]) == 2  # Ray would retry for minutes
    assert "--ray-address: nothing answers at 127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "s" / "S0-lr0.001-seed0").exists()
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


def test_plot_joins_more_directories_and_names_each_r_batch(tmp_path, monkeypatch, capsys):
    """`stalerl plot SWEEP MORE..`: a stabilizer sweep at another R_batch joins the figures of the first
    directory, and the staleness-aware rate's lines say which R_batch they ran with."""
    from stalerl.lab import plots
    from stalerl.lab.runs import RunRecord

    def run(stabilizer, r_batch):
        metrics = [{"step": t, "train_reward": 0.3, "grad_cos_sim": 0.9, "val_reward": 0.3} for t in range(20)]
        config = {"staleness": {"staleness": 4}, "optim": {"lr": 1e-3}, "seed": 0,
                  "stabilizer": {"lr_control": stabilizer, "r_batch": r_batch}}
        return RunRecord(tmp_path, config, {"collapse_step": None, "steps": 20}, metrics)

    sweep, more = tmp_path / "sweep", tmp_path / "stab-r0.9"
    sweep.mkdir()
    loaded = {sweep: [run("none", 2.33), run("staleness", 2.33)], more: [run("staleness", 0.9)]}
    monkeypatch.setattr(plots, "load_runs", lambda directory: loaded[directory])
    assert [plots.stabilizer_label(r) for r in loaded[sweep] + loaded[more]] == [
        "fixed lr", "staleness (R_batch 2.33)", "staleness (R_batch 0.9)"]
    assert main(["plot", str(sweep), str(more)]) == 0
    assert (sweep / "stabilizers.png").stat().st_size > 10_000 and not (more / "stabilizers.png").exists()
    assert "figure: " in capsys.readouterr().out


def fabricated_cell(directory, config, finished=True):
    """A cell's run directory as train() leaves it, without training: config.yaml, metrics, summary."""
    from stalerl.config import save_config

    directory.mkdir(parents=True)
    save_config(config, directory / "config.yaml")
    rows = [{"step": t, "version": t, "train_reward": 0.3, "drift": 0.1 * t, "path_length": 0.1 * t, "g_upd": 100.0}
            for t in range(config.steps)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if finished:
        (directory / "summary.json").write_text(json.dumps({
            "steps": config.steps, "collapse_step": None, "best_val_reward": 0.3, "final_val_reward": 0.3,
            "initial_val_reward": 0.3, "g_upd_median": 100.0, "drift_at_collapse": None, "wall_s": 12.5}))
    return sorted(path.name for path in directory.iterdir())


def test_a_cell_of_another_config_is_refused_and_kept(tmp_path, capsys):
    """A finished cell was reused by its name alone, and an unfinished one of another config deleted."""
    from stalerl.config import TrainConfig, override
    from stalerl.lab.sweep import cell_configs

    out = tmp_path / "sweep"
    argv = ["sweep", "--staleness", "0,2", "--lr", "1e-3", "--steps", "12", "--out", str(out), "--no-progress",
            "--no-figures"]
    other = override(TrainConfig(), {"steps": 40, "staleness.mode": "bounded", "threads": 1, "tensorboard": False})
    (_, finished), (_, unfinished) = cell_configs(other, out, [0, 2], [1e-3], [0], ["none"])
    kept = {"S0-lr0.001-seed0": fabricated_cell(out / "S0-lr0.001-seed0", finished),
            "S2-lr0.001-seed0": fabricated_cell(out / "S2-lr0.001-seed0", unfinished, finished=False)}
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("stalerl: error: sweep cell S0-lr0.001-seed0: ")
    assert "steps: 40 -> 12, staleness.mode: 'bounded' -> 'exact'" in error and "1 more cell" in error
    for name, files in kept.items():  # nothing deleted, nothing run
        assert sorted(path.name for path in (out / name).iterdir()) == files
    assert not (out / "sweep.json").exists()

    (out / "S0-lr0.001-seed0").rename(tmp_path / "moved")
    (out / "S0-lr0.001-seed0").mkdir()
    (out / "S0-lr0.001-seed0" / "notes.txt").write_text("mine")  # not a run: refused, not deleted
    assert main(argv) == 2
    assert "S0-lr0.001-seed0" in capsys.readouterr().err and (out / "S0-lr0.001-seed0" / "notes.txt").is_file()


def test_a_finished_cell_of_this_config_is_reused(tmp_path, capsys):
    """The same config up to settings a fixed-lr run never reads (the staleness cap's R_batch)."""
    from stalerl.config import TrainConfig, override
    from stalerl.lab.sweep import cell_configs

    out = tmp_path / "sweep"
    base = override(TrainConfig(), {"steps": 12, "threads": 1, "tensorboard": False})
    (_, config), = cell_configs(base, out, [0], [1e-3], [0], ["none"])
    fabricated_cell(out / "S0-lr0.001-seed0", config)
    assert main(["sweep", "-S", "0", "--lr", "1e-3", "--steps", "12", "--out", str(out), "--no-progress",
                 "--no-figures", "--set", "stabilizer.r_batch=2.33"]) == 0
    row, = json.loads((out / "sweep.json").read_text())
    assert row["wall_s"] == 12.5  # read from the cell, not run again


def test_two_values_that_name_one_cell_are_refused(tmp_path, capsys):
    assert main(["sweep", "-S", "0", "--lr", "1e-4,0.0001", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "S0-lr0.0001-seed0" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_collapse_figure_draws_collapsed_versions(tmp_path):
    """T_c in collapse.png is the collapsed policy version (what advise fits), not the learner step, and
    a collapse at version 0 is drawn."""
    from stalerl.lab.plots import collapse_figure, collapse_points
    from stalerl.lab.runs import RunRecord

    def run(staleness, lr, version):
        config = {"staleness": {"staleness": staleness}, "optim": {"lr": lr}, "seed": 0, "stabilizer": {}}
        summary = {"collapse_step": None if version is None else version + staleness, "collapse_version": version,
                   "steps": 50}
        metrics = [{"step": t, "version": max(t - staleness, 0), "train_reward": 0.1} for t in range(50)]
        return RunRecord(tmp_path, config, summary, metrics)

    runs = [run(0, 1e-3, 0), run(16, 1e-3, 3), run(4, 1e-3, 2), run(16, 1e-4, None)]
    points = collapse_points(runs)
    assert points["by_eta"][0] == ([1e-3], [0]) and points["by_eta"][16] == ([1e-3], [3])
    assert points["censored"][16] == ([1e-4], [33])  # the newest version the run saw
    assert points["by_s"][1e-3] == ([4, 16], [2, 3])
    assert collapse_figure(runs, tmp_path / "collapse.png").stat().st_size > 10_000
    # another seed's run at the same (S, lr) is not joined to these lines
    other_seed = run(4, 1e-4, 40)
    other_seed.config["seed"] = 1
    assert collapse_points([*runs, other_seed], seed=0)["by_s"][1e-3] == ([4, 16], [2, 3])
    assert 1e-4 not in collapse_points([*runs, other_seed], seed=0)["by_s"]


def test_vllm_cells_get_a_fresh_process_each(tmp_path, monkeypatch):
    """vLLM in process keeps its GPU memory after its engine closes: one cell per worker process."""
    import concurrent.futures

    from stalerl.config import TrainConfig, override, validate
    from stalerl.lab import sweep

    pools = []

    class Recorder(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, **options):
            pools.append(options)
            raise RuntimeError("recorded")

    monkeypatch.setattr(sweep.concurrent.futures, "ProcessPoolExecutor", Recorder)
    import stalerl.preflight

    monkeypatch.setattr(stalerl.preflight, "check_inputs", lambda config: None)  # vLLM here would be refused (no GPU)
    for engine, expected in (("transformers", None), ("vllm", 1)):
        base = validate(override(TrainConfig(), {"model.name_or_path": "some/checkpoint", "rollout.engine": engine}))
        cells = sweep.cell_configs(base, tmp_path / engine, [0], [1e-4], [0], ["none"])
        try:
            sweep.run_sweep(cells, tmp_path / engine, workers=1, progress=False)
        except RuntimeError:
            pass
        assert pools[-1].get("max_tasks_per_child") == expected
