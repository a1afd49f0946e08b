import dataclasses
import os

import pytest

from stalerl.config import TrainConfig


@pytest.fixture(scope="session", autouse=True)
def warm_start_cache(tmp_path_factory):
    """One warm-start cache for the whole session, so the supervised phase runs once."""
    # Under pytest-xdist every worker is a session: they share one cache (beside their own temporary
    # directories), and the first to need the warm start builds it while the others wait (warmstart.py).
    shared = tmp_path_factory.getbasetemp().parent / "stalerl-cache" if os.environ.get("PYTEST_XDIST_WORKER") else None
    path = os.environ.get("STALERL_TEST_CACHE") or str(shared or tmp_path_factory.mktemp("stalerl-cache"))
    previous = os.environ.get("STALERL_CACHE")
    os.environ["STALERL_CACHE"] = path
    yield path
    if previous is None:
        os.environ.pop("STALERL_CACHE", None)
    else:
        os.environ["STALERL_CACHE"] = previous


@pytest.fixture
def small_config(tmp_path) -> TrainConfig:
    """The embedded default, shortened: a handful of steps, no progress bar, no TensorBoard."""
    config = TrainConfig(steps=8, val_every=4, progress=False, tensorboard=False, out=str(tmp_path / "run"))
    return dataclasses.replace(
        config, rollout=dataclasses.replace(config.rollout, prompts_per_step=8, group_size=4),
        task=dataclasses.replace(config.task, val_size=64),
    )
