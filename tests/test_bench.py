"""A cut-down `stalerl bench`: every part runs, bench.json has the documented shape, numbers are sane.

The TRL comparison runs only where TRL is installed (`pip install 'stalerl[bench]'`)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from stalerl.bench.generation import bench_generation
from stalerl.bench.overlap import sides_rate
from stalerl.bench.plan import CHECKPOINT, FULL, QUICK, base_config
from stalerl.bench.suite import REPORT_FORMAT, checked_model_settings, kept_parts, on_gpu, run_bench
from stalerl.bench.table import format_table
from stalerl.bench.trl_step import checkpointing_field, grpo_config_kwargs, trl_version
from stalerl.cli import main

TINY = QUICK.__class__(repeats=1, step_steps=4, gen_calls=1, async_steps=5, async_staleness=(2,), sweep_cells=2,
                       sweep_steps=1, memory_staleness=(0, 2), memory_prompts=(4, 8),
                       memory_model={"model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2,
                                     "warm_start.steps": 1})


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow  # ~15 fresh interpreters: about a minute on an idle 2-core machine
def test_bench_writes_a_complete_report(tmp_path):
    report = run_bench(tmp_path, quick=True, plan=TINY, log=lambda text: None)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
    assert all(math.isfinite(x) for x in _numbers(report))
    assert report["machine"]["cpu"] and report["machine"]["cpu_capability"] and "stalerl_git" in report["machine"]

    step = report["step"]
    assert step["stalerl"]["s_per_step"] > 0 and step["stalerl"]["samples_per_s"] > 0
    assert step["stalerl_whole_prompts"]["s_per_step"] > 0 and step["prompt_sharing_speedup"] > 0
    assert step["stalerl_skip_padding"]["s_per_step"] > 0 and step["skip_padding_speedup"] > 0
    if trl_version() is None:
        assert step["trl"] is None and step["ratio_trl_over_stalerl"] is None
    else:
        assert step["trl"]["s_per_step"] > 0 and step["ratio_trl_over_stalerl"] > 0 and step["differences"]
        assert step["ratio_trl_over_stalerl_skip_padding"] > 0
    gen = report["gen"]
    assert gen["stalerl"]["tokens_per_s"] > 0 and gen["plain_generate"]["tokens_per_s"] > 0
    assert gen["ratio_stalerl_over_plain"] > 0 and gen["ratio_whole_prompts_over_plain"] > 0
    pipe = report["async"]
    assert pipe["ideal_overlap"] >= 1 and "process_worker_error" not in pipe
    assert [(row["S"], row["worker"]) for row in pipe["rows"]] == [(0, "thread"), (2, "thread"), (2, "process")]
    assert pipe["rows"][0]["speedup"] == 1 and all(row["steps_per_s"] > 0 for row in pipe["rows"])
    sweep = report["sweep"]
    assert sweep["cells"] == 2 and sweep["parallel_wall_s"] > 0 and sweep["sum_of_single_runs_s"] > 0
    assert 0 < sweep["core_utilisation"] <= 1.05 and 0 < sweep["bound"] <= sweep["parallel_over_sum_of_runs"] * 1.05
    memory = report["memory"]
    assert all(row["peak_rss_mb"] > 100 for row in memory["rows"])  # an interpreter with torch loaded
    assert {(row["S"], row["cycle_history"]) for row in memory["rows"] if row["model"] == "wide"} == {
        (0, True), (0, False), (2, True), (2, False)}
    assert memory["weight_mb_wide"] > 0
    table = format_table(report)
    assert "step" in table and "prompts run whole" in table and "mem" in table
    assert table.splitlines()[2].startswith("quick: a smoke test of every part")


def test_async_rows_off_their_steady_rate_are_flagged():
    """What a 1B model's 8-step async runs on the H100 gave: an S = 0 run slower than its median batch and
    step allow, and S = 2 runs faster than their slower side (their queue's head start)."""
    rows = [{"S": 0, "worker": "thread", "steps_per_s": 0.747, "speedup": 1.0, "fraction_of_ideal": 0.69,
             "sides_steps_per_s": sides_rate(0, 0.739, 0.327), "wall_s": 49.5},
            {"S": 1, "worker": "thread", "steps_per_s": 1.043, "speedup": 1.40, "fraction_of_ideal": 0.97,
             "sides_steps_per_s": sides_rate(1, 0.957, 0.419), "wall_s": 26.1},
            {"S": 2, "worker": "thread", "steps_per_s": 1.145, "speedup": 1.53, "fraction_of_ideal": 1.06,
             "sides_steps_per_s": sides_rate(2, 0.999, 0.628), "wall_s": 27.2},
            {"S": 2, "worker": "process", "steps_per_s": 1.255, "speedup": 1.68, "fraction_of_ideal": 1.16,
             "sides_steps_per_s": sides_rate(2, 0.929, 0.830), "wall_s": 39.4}]
    assert rows[0]["sides_steps_per_s"] == pytest.approx(1 / 1.066) and rows[3]["sides_steps_per_s"] == pytest.approx(1 / 0.929)
    table = format_table({"quick": False, "plan": {"repeats": 1}, "model": {"checkpoint": "1b"},
                          "machine": {"cpus": 16, "load_avg_before": [0], "load_avg_after": [0], "gpu": "H100"},
                          "async": {"ideal_overlap": 1.44, "t_gen_s": 0.739, "t_sample_s": 0.711, "weight_sync_s": 0.016,
                                    "t_train_s": 0.327, "rows": rows}})
    flagged = table.splitlines()[-1]
    assert flagged.startswith("      not steady") and "--async-steps" in flagged
    assert "S=0 thread 0.75/s against 0.94/s" in flagged and "S=2 thread 1.15/s against 1.00/s" in flagged
    assert "S=2 process 1.25/s against 1.08/s" in flagged
    assert "S=1 thread" not in flagged  # 1.043 against 1.045: steady


def test_the_own_stream_rows_get_a_line_of_their_own_and_a_failure_is_named():
    def table(pipe: dict) -> list[str]:
        report = {"quick": False, "plan": {"repeats": 1}, "model": {"checkpoint": "1b"},
                  "machine": {"cpus": 16, "load_avg_before": [0], "load_avg_after": [0], "gpu": "H100"},
                  "async": {"ideal_overlap": 1.44, "t_gen_s": 0.739, "t_sample_s": 0.711, "weight_sync_s": 0.016,
                            "t_train_s": 0.327} | pipe}
        return format_table(report).splitlines()

    def row(s: int, worker: str, rate: float) -> dict:
        return {"S": s, "worker": worker, "steps_per_s": rate, "speedup": rate / 0.9, "fraction_of_ideal": rate / 1.3,
                "sides_steps_per_s": rate, "wall_s": 30.0}

    lines = table({"rows": [row(0, "thread", 0.9), row(1, "thread", 1.0), row(1, "own_stream", 1.2)]})
    assert "S=1 1.00/s" in lines[-2] and "own_stream" not in lines[-2] and "S=0 0.90/s" in lines[-2]
    assert lines[-1] == "      rollout thread on a CUDA stream of its own: S=1 1.20/s 1.33x (92% of ideal)"
    lines = table({"rows": [row(0, "thread", 0.9), row(1, "thread", 1.0)],
                   "own_stream_worker_error": "RuntimeError: CUDA error"})
    assert lines[-1] == "      rollout thread on a CUDA stream of its own failed: RuntimeError: CUDA error"
    lines = table({"rows": [row(0, "thread", 0.9), row(1, "thread", 1.0)], "unfinished": [2, 4]})
    assert lines[-1] == "      unfinished: the bench stopped after 2 of its 4 async runs"


def test_an_async_part_cut_short_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    """A GPU session's time limit can stop the bench mid-part: bench.json then has the runs so far.
    The timed runs are replaced by their figures here (the report's bookkeeping is under test; the
    real runs are in test_bench_writes_a_complete_report), and the fourth one fails."""
    import stalerl.bench.overlap as overlap
    from stalerl.bench.plan import WARMUP_STEPS
    from stalerl.bench.runs import train_run

    started = []

    def timed_run(function, config_data, warmup):
        assert function is train_run and warmup == WARMUP_STEPS
        started.append((config_data["staleness"]["staleness"], config_data["runtime"]["local_worker"]))
        if len(started) == 4:
            raise RuntimeError("time is up")
        return {"s_per_step": 0.1, "steps_per_s": 10.0 + len(started), "gen_s": 0.03, "rollout_s": 0.04,
                "weight_sync_s": 0.001, "train_s": 0.06, "wall_s": 5.0, "steps_timed": 2}

    monkeypatch.setattr(overlap, "isolated", timed_run)
    with pytest.raises(RuntimeError, match="time is up"):
        run_bench(tmp_path, quick=True, plan=dataclasses.replace(TINY, async_staleness=(1, 2)), parts=("async",),
                  log=lambda text: None)
    assert started == [(0, "thread"), (1, "thread"), (1, "process"), (2, "thread")]
    pipe = json.loads((tmp_path / "bench.json").read_text())["async"]
    assert pipe["unfinished"] == [3, 5]
    assert [(row["S"], row["worker"], row["steps_per_s"]) for row in pipe["rows"]] == [
        (0, "thread", 11.0), (1, "thread", 12.0), (1, "process", 13.0)]
    assert pipe["rows"][2]["speedup"] == pytest.approx(13 / 11)


REAL_SWEEP_PART = {"cells": 12, "steps": 40, "parallel_wall_s": 38.0, "sum_of_single_runs_s": 51.0,
                   "parallel_over_sum_of_runs": 0.74, "bound": 0.63, "single_runs_cores_used": 1.3,
                   "core_utilisation": 0.86, "serial_wall_s": 55.0}


def test_rerunning_some_parts_keeps_the_others(tmp_path, capsys):
    """`stalerl bench --parts step,memory` into the full suite's directory replaced its report."""
    full = {"format": REPORT_FORMAT, "quick": False, "plan": {"repeats": 3}, "machine": {"cpus": 2},
            "model": {"checkpoint": "embedded default"}, "step": {"ratio": 1.9}, "sweep": REAL_SWEEP_PART, "wall_s": 900.0}
    (tmp_path / "bench.json").write_text(json.dumps(full))
    kept = kept_parts(tmp_path / "bench.json", ("step", "memory"))
    assert kept["sweep"] == REAL_SWEEP_PART and "step" not in kept
    assert kept["earlier_parts"] == {"sweep": {key: full[key] for key in ("quick", "plan", "machine", "model")}}
    assert "kept from an earlier bench in this directory, full, model embedded default" in format_table(
        {**full, "machine": {"cpus": 2, "load_avg_before": [1.0], "load_avg_after": [1.0], "gpu": None}, "step": {
            "stalerl": {"s_per_step": 0.1, "samples_per_s": 1280}, "trl": None, "stalerl_whole_prompts": {
                "s_per_step": 0.2}, "prompt_sharing_speedup": 2.0}, **kept})
    # a third run keeps the sweep's first source, not the second run's
    again = {**full, "quick": True, "step": {"ratio": 2.0}, **kept}
    (tmp_path / "bench.json").write_text(json.dumps(again))
    assert kept_parts(tmp_path / "bench.json", ("step",))["earlier_parts"]["sweep"]["quick"] is False
    assert kept_parts(tmp_path / "bench.json", ("step", "sweep")) == {}
    (tmp_path / "bench.json").write_text("{not json")
    assert main(["bench", "--out", str(tmp_path), "--parts", "step"]) == 2
    assert "bench.json: not a bench report" in capsys.readouterr().err
    (tmp_path / "bench.json").write_text("[]")
    assert main(["bench", "--out", str(tmp_path), "--parts", "step"]) == 2
    assert "bench.json: not a bench report (not a JSON object)" in capsys.readouterr().err
    # a report from before the format field (the committed one, as it was): its other parts would
    # not read the same way
    committed = json.loads((Path(__file__).parents[1] / "docs" / "bench" / "bench.json").read_text())
    assert committed["format"] == REPORT_FORMAT
    (tmp_path / "bench.json").write_text(json.dumps({key: value for key, value in committed.items() if key != "format"}))
    assert main(["bench", "--out", str(tmp_path), "--parts", "step"]) == 2
    assert (f"is a report of another stalerl version (format 1, this one writes {REPORT_FORMAT}): its gen, async, "
            "sweep, memory part(s) would be lost") in capsys.readouterr().err


@pytest.mark.parametrize("argv, plan", [([], FULL), (["--repeats", "7"], dataclasses.replace(FULL, repeats=7)),
                                        (["--quick", "--repeats", "2"], dataclasses.replace(QUICK, repeats=2)),
                                        (["--async-steps", "20"], dataclasses.replace(FULL, async_steps=20)),
                                        (["--model", "random:tiny", "--data", "d.jsonl", "--async-steps", "16"],
                                         dataclasses.replace(CHECKPOINT, async_steps=16)),
                                        (["--async-staleness", "4, 1,4"],
                                         dataclasses.replace(FULL, async_staleness=(1, 4)))])
def test_each_plan_option_replaces_only_its_field_of_the_plan(tmp_path, monkeypatch, argv, plan):
    import stalerl.bench.cli as bench_cli

    class Planned(Exception):
        pass

    def record(out, quick, plan=None, **kwargs):
        raise Planned(plan)

    monkeypatch.setattr(bench_cli, "run_bench", record)
    with pytest.raises(Planned) as raised:
        main(["bench", "--out", str(tmp_path), *argv])
    assert raised.value.args[0] == plan


def test_bench_refuses_unknown_parts(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--parts", "step,warp"]) == 2
    assert "--parts: unknown 'warp'" in capsys.readouterr().err


@pytest.mark.slow  # a tiny random checkpoint, 4 fresh interpreters: about 20 s on 2 cores
def test_bench_times_a_checkpoint_on_the_math_task(tmp_path):
    from hf_checkpoint import SAMPLE

    plan = TINY.__class__(**{**TINY.__dict__, "gen_calls": 1, "async_steps": 4, "async_staleness": (1,)})
    report = run_bench(tmp_path, quick=True, plan=plan, parts=("gen", "async"), log=lambda text: None,
                       checkpoint="random:tiny", data=str(SAMPLE), settings={"rollout.max_new_tokens": 8})
    assert set(report) >= {"gen", "async", "model"} and "step" not in report
    settings = report["model"]["settings"]
    assert settings["task.name"] == "math" and settings["rollout.max_new_tokens"] == 8
    assert report["gen"]["max_new_tokens"] == 8 and report["gen"]["plain_generate"]["tokens_per_s"] > 0
    pipe = report["async"]
    assert [(row["S"], row["worker"]) for row in pipe["rows"]] == [(0, "thread"), (1, "thread"), (1, "process")]
    assert pipe["weight_sync_s"] > 0 and all(row["sides_steps_per_s"] > 0 and row["weight_sync_s"] >= 0
                                             for row in pipe["rows"])
    assert pipe["t_gen_s"] >= pipe["t_sample_s"] > 0  # the rollout side: sampling, reward, weight load
    assert all(math.isfinite(x) for x in _numbers(report))
    assert "model random:tiny" in format_table(report)


@pytest.mark.slow  # 2 fresh interpreters with a tiny checkpoint: about 15 s on 2 cores
def test_the_static_cache_variants_are_timed_side_by_side(tmp_path):
    """What the gen part adds for a model on a GPU, run here on CPU where transformers does not compile."""
    from hf_checkpoint import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", hidden_size=48)
    model = checked_model_settings(str(checkpoint), SAMPLE_FILE, {"rollout.max_new_tokens": 8}, ("gen",))
    plan = TINY.__class__(**{**TINY.__dict__, "gen_calls": 1})
    assert on_gpu(model) == torch.cuda.is_available() and not on_gpu({})  # the embedded default stays on CPU
    gen = bench_generation(plan, model, with_static_cache=True)
    for name in ("stalerl", "plain_generate", "stalerl_static_cache", "plain_generate_static_cache"):
        assert gen[name]["tokens_per_s"] > 0 and gen[name]["first_call_s"] > 0
    assert gen["ratio_static_over_plain_static"] > 0 and gen["ratio_static_over_stalerl"] > 0
    line = format_table({"quick": True, "plan": {"repeats": 1}, "gen": gen, "model": {"checkpoint": "tiny"},
                         "machine": {"cpus": 2, "load_avg_before": [0, 0, 0], "load_avg_after": [0, 0, 0], "gpu": None}})
    assert "static cache (compiled decoding): stalerl engine" in line


SAMPLE_FILE = str(Path(__file__).resolve().parent.parent / "data" / "gsm8k_sample.jsonl")


@pytest.mark.parametrize("argv, message", [
    (["--model", "random:llama-9b", "--data", SAMPLE_FILE], "--model: unknown random shape 'llama-9b'"),
    (["--model", "random:tiny"], "--data: a checkpoint needs"),
    (["--model", "./no/such/checkpoint", "--data", SAMPLE_FILE], "--model: directory not found: ./no/such"),
    (["--model", "random:tiny", "--data", "no/such.jsonl"], "--data: file not found: no/such.jsonl"),
    (["--model", "random:tiny", "--data", SAMPLE_FILE, "--parts", "step"], "--parts: with --model only"),
    (["--data", SAMPLE_FILE], "--data: needs --model"),
    (["--set", "rollout.group_size=0"], "rollout.group_size"),
    (["--parts", "async", "--set", "staleness.staleness=1"], "--set staleness.staleness: the bench sets it itself"),
    (["--set", "steps=10"], "--set steps: the bench sets it itself"),
    (["--repeats", "-1"], "--repeats: must be >= 1"),
    (["--repeats", "0"], "--repeats: must be >= 1 (got 0)"),
    (["--async-steps", "4"], "--async-steps: must be >= 5, the first 3 are not timed (got 4)"),
    (["--async-staleness", "0,2"], "--async-staleness: comma-separated whole numbers >= 1 (S = 0 always runs), "
                                   "got '0,2'"),
    (["--async-staleness", "two"], "--async-staleness: comma-separated whole numbers >= 1"),
    (["--async-staleness", "1,²"], "--async-staleness: comma-separated whole numbers >= 1"),
    (["--set", "runtime.local_worker=process"], "--set runtime.local_worker: the bench sets it itself"),
])
def test_bench_refuses_bad_model_arguments_before_any_work(tmp_path, capsys, argv, message):
    assert main(["bench", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_llama_1b_shape_has_the_released_models_parameter_count():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stalerl.random_checkpoint import SHAPES

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES["llama-3.2-1b"]))
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # Llama-3.2-1B, embeddings tied


def _report_pid_then_sleep(path: str) -> dict:
    import os
    import time

    Path(path).write_text(str(os.getpid()))
    time.sleep(120)
    return {}


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_timed_run_ends_when_the_bench_is_killed(tmp_path, method):
    """`timeout stalerl bench ... | tee log` must not hang on a worker that outlives the bench.
    Forked, the run's parent is the fork server, which lives as long as its children do."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    script = ("import sys; sys.path.insert(0, sys.argv[2]); from stalerl.bench.runs import isolated; "
              "from test_bench import _report_pid_then_sleep; isolated(_report_pid_then_sleep, sys.argv[1], "
              "method=sys.argv[3])")
    bench = subprocess.Popen([sys.executable, "-c", script, str(pid_file), str(Path(__file__).parent), method])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    bench.send_signal(signal.SIGKILL)
    bench.wait()
    stat = Path(f"/proc/{worker}/stat")
    while time.monotonic() < deadline:
        try:  # gone, or a zombie that the reaper has not collected yet
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the timed run's process outlived the killed bench by a minute")


def test_a_forked_run_is_the_run_a_spawned_interpreter_makes(tmp_path):
    """The fork server has imported stalerl and run nothing, so a run forked from it (what the bench
    does on CPU) makes the same steps, bit for bit, as one in a fresh interpreter."""
    from test_train import TIMING_KEYS

    from stalerl.bench.runs import isolated, train_run
    from stalerl.forking import start_method
    from stalerl.metrics import read_metrics

    if not torch.cuda.is_available():
        assert start_method() == "forkserver"
    rows = {}
    for method in ("forkserver", "spawn"):
        config = base_config(steps=4, out=str(tmp_path / method))
        result = isolated(train_run, config.to_dict(), 1, method=method)
        assert result["steps_timed"] == 3 and result["peak_rss_mb"] > 100
        rows[method] = [{key: value for key, value in row.items() if key not in TIMING_KEYS}
                        for row in read_metrics(tmp_path / method)]
    assert len(rows["spawn"]) == 4 and rows["forkserver"] == rows["spawn"]


def test_trl_does_the_same_work_as_stalerl():
    """GRPOConfig checkpoints activations unless told not to: the forward would run twice on TRL's side."""
    kwargs = grpo_config_kwargs(base_config(), steps=5, output_dir="unused")
    assert kwargs[checkpointing_field()] is False and kwargs["num_iterations"] == 1 and kwargs["beta"] == 0.0
    if trl_version() is not None:
        from trl import GRPOConfig

        assert GRPOConfig(**kwargs).gradient_checkpointing is False
