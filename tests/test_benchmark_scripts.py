"""The benchmark scripts that the GPU checks run (benchmarks/gpu_check.sh), run here on CPU."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hf_checkpoint import ROOT, save_tiny_checkpoint


@pytest.mark.slow  # one interpreter, a tiny checkpoint: about 10 s on 2 cores
def test_generate_profile_reports_each_call_per_decoding_step(tmp_path: Path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate_profile.py"), "--model", str(checkpoint),
                           "--tokens", "4"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "ms a step" in line]
    assert [line.split(":")[0] for line in lines] == [
        "stalerl (a group's prompt shared)", "stalerl (prompts whole)", "plain generate"]
    for line in lines:
        steps = int(re.search(r"(\d+) steps", line).group(1))
        assert 1 <= steps <= 4 and "kernel launches" in line and "GPU busy" in line
    assert "aten::mm" in done.stdout  # the operators with the most host time, under each call


@pytest.mark.slow  # one interpreter, a tiny random Llama: a few seconds
def test_skip_padding_times_every_way_on_the_same_batch(tmp_path: Path):
    report = tmp_path / "skip.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "skip_padding.py"), "--shape", "tiny",
                           "--responses", "16", "--repeats", "1", "--micro-batches", "0,16", "--json", str(report)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert sorted(result["median_s"]) == sorted(f"micro-batch {micro}, skip_padding={skip}"
                                                for micro in ("whole", 16) for skip in (False, True))
    assert all(seconds > 0 for seconds in result["median_s"].values())
    assert 0.25 < result["real_fraction"] < 1 and result["device"] == "cpu"
    assert done.stdout.count("x the time") == 2


@pytest.mark.slow  # a short run of a tiny checkpoint in a fresh process: about 10 s on 2 cores
def test_async_workers_reports_each_run_and_worker(tmp_path: Path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    script = [sys.executable, str(ROOT / "benchmarks" / "async_workers.py"), "--model", str(checkpoint),
              "--data", str(ROOT / "data" / "gsm8k_sample.jsonl")]
    refused = subprocess.run([*script, "--workers", "thread,fiber"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--workers: unknown 'fiber'" in refused.stderr
    report = tmp_path / "workers.json"
    done = subprocess.run([*script, "--workers", "thread", "--steps", "5", "--repeats", "1",
                           "--set", "rollout.max_new_tokens=8", "--json", str(report)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert list(result["workers"]) == ["thread"] and result["staleness"] == 1
    [run] = result["workers"]["thread"]["runs"]
    assert run["steps_timed"] == 2 and run["steps_per_s"] > 0 and run["rollout_s"] > 0
    assert result["workers"]["thread"]["over_first"] == 1.0
    assert [line.split()[2] for line in done.stdout.splitlines() if line.startswith("repeat")] == ["thread"]


def test_update_geometry_reports_its_time_and_the_bytes_it_holds():
    # host mode: the device mode's three vectors and the staging one (tests/test_geometry.py checks both)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "update_geometry.py"), "--mode", "host",
                           "--floats", str(2**20), "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "hold 16 bytes a parameter" in done.stdout and "ms a step" in done.stdout
