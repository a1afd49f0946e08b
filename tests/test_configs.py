"""Every recipe under configs/ loads and validates."""

from pathlib import Path

import pytest

from stalerl.config import TrainConfig, load_config

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
