"""A cut-down `stalerl bench`: every part runs, bench.json has the documented shape, numbers are sane.

The TRL comparison runs only where TRL is installed (`pip install 'stalerl[bench]'`)."""

import json
import math

import pytest

from stalerl.bench import QUICK, format_table, run_bench
from stalerl.bench_trl import trl_version
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

    step = report["step"]
    assert step["stalerl"]["s_per_step"] > 0 and step["stalerl"]["samples_per_s"] > 0
    assert step["stalerl_whole_prompts"]["s_per_step"] > 0 and step["prompt_sharing_speedup"] > 0
    if trl_version() is None:
        assert step["trl"] is None and step["ratio_trl_over_stalerl"] is None
    else:
        assert step["trl"]["s_per_step"] > 0 and step["ratio_trl_over_stalerl"] > 0 and step["differences"]
    gen = report["gen"]
    assert gen["stalerl"]["tokens_per_s"] > 0 and gen["plain_generate"]["tokens_per_s"] > 0
    assert gen["ratio_stalerl_over_plain"] > 0 and gen["ratio_whole_prompts_over_plain"] > 0
    pipe = report["async"]
    assert pipe["ideal_overlap"] >= 1 and [row["S"] for row in pipe["rows"]] == [0, 2]
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


def test_bench_refuses_unknown_parts(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--parts", "step,warp"]) == 2
    assert "--parts: unknown 'warp'" in capsys.readouterr().err
