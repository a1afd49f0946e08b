"""Every recipe under configs/ loads and validates."""

import json
import re
from pathlib import Path

import pytest

from stalerl.config import TrainConfig, load_config, override
from stalerl.data import check_task_inputs

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_recipes_exist():
    names = {path.name for path in CONFIGS}
    assert {"tiny.yaml", "llama-3.2-1b-gsm8k.yaml", "llama-3.2-3b-gsm8k.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_loads(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)


def test_tiny_is_the_default():
    assert load_config(Path(CONFIGS[0]).parent / "tiny.yaml") == TrainConfig()


@pytest.mark.parametrize("path", [path for path in CONFIGS if "gsm8k" in path.name], ids=lambda path: path.name)
def test_the_recipes_jsonl_instructions_pass_the_task_checks(path, tmp_path):
    """Each GPU recipe says how to run it on JSONL files instead of the hub dataset; those overrides,
    as written there, give a task that check_task_inputs accepts."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "JSONL files work the same:" in line)
    line = " ".join(lines[start: start + 2])  # the instruction and its continuation line
    overrides = dict(re.findall(r"--set ([\w.]+)=(\S*)", line))
    sample = [json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) for i in range(80)]
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("\n".join(sample) + "\n")
        overrides = {key: str(tmp_path / name) if value == name else value for key, value in overrides.items()}
    assert set(overrides) >= {"task.data", "task.val_data"}
    check_task_inputs(override(load_config(path), overrides))
