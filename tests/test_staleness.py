"""The staleness pipeline with stub engines: its guarantees hold whatever the relative speeds."""

import random
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from stalerl.staleness import RolloutWorkerError, ThreadedRollouts, check_lag, required_version

SAMPLES_PER_BATCH = 16


class StubEngine:
    def __init__(self):
        self.version = 0
        self.loaded: list[int] = []

    def load_weights(self, state_dict, version):
        assert int(state_dict["w"]) == version  # the weights that arrive are the version announced
        self.version = version
        self.loaded.append(version)

    def close(self):
        self.closed = True


@dataclass
class StubBatch:
    batch_index: int
    version: int
    sample_ids: list[int] = field(default_factory=list)


def make_producer(engine, gen_delay):
    def produce(batch_index):
        time.sleep(gen_delay())
        ids = list(range(batch_index * SAMPLES_PER_BATCH, (batch_index + 1) * SAMPLES_PER_BATCH))
        return StubBatch(batch_index, engine.version, ids)
    return produce


def run_learner(mode, staleness, steps, gen_delay, train_delay):
    engine = StubEngine()
    source = ThreadedRollouts(engine, make_producer(engine, gen_delay), mode, staleness, total_batches=steps)
    lags, sample_ids = [], []
    try:
        for step in range(steps):
            batch = source.next_batch()
            assert batch.batch_index == step
            lags.extend([step - batch.version] * len(batch.sample_ids))
            sample_ids.extend(batch.sample_ids)
            time.sleep(train_delay())
            source.publish({"w": torch.tensor(step + 1)}, version=step + 1)
    finally:
        source.close()
    return lags, sample_ids, engine


def jitter(low, high, seed):
    rng = random.Random(seed)
    return lambda: rng.uniform(low, high)


@pytest.mark.parametrize("staleness", [0, 1, 4])
@pytest.mark.parametrize("speeds", ["slow_learner", "slow_generator"])
def test_exact_mode_lag_is_exactly_s(staleness, speeds):
    fast, slow = jitter(0, 0.0005, 1), jitter(0.001, 0.003, 2)
    gen, train = (fast, slow) if speeds == "slow_learner" else (slow, fast)
    steps = 40
    lags, ids, engine = run_learner("exact", staleness, steps, gen, train)
    per_step = lags[::SAMPLES_PER_BATCH]
    assert per_step == [min(step, staleness) for step in range(steps)]
    assert engine.loaded == list(range(1, steps - staleness))  # every version, in order, once
    assert len(ids) == len(set(ids)) == steps * SAMPLES_PER_BATCH


@pytest.mark.parametrize("staleness", [0, 2, 5])
@pytest.mark.parametrize("speeds", ["slow_learner", "slow_generator", "jittery"])
def test_bounded_mode_never_exceeds_s_over_1000_samples(staleness, speeds):
    gen, train = {
        "slow_learner": (jitter(0, 0.0003, 3), jitter(0.001, 0.002, 4)),
        "slow_generator": (jitter(0.001, 0.002, 5), jitter(0, 0.0003, 6)),
        "jittery": (jitter(0, 0.002, 7), jitter(0, 0.002, 8)),
    }[speeds]
    steps = 70  # 70 x 16 = 1120 consumed samples
    lags, ids, _ = run_learner("bounded", staleness, steps, gen, train)
    assert len(lags) >= 1000
    assert min(lags) >= 0 and max(lags) <= staleness
    assert len(ids) == len(set(ids)) == steps * SAMPLES_PER_BATCH  # paced, none discarded or repeated
    if speeds == "slow_learner" and staleness > 0:
        assert max(lags) == staleness  # a fast generator runs ahead up to the bound, not past it


def test_worker_failure_reaches_the_learner():
    engine = StubEngine()

    def produce(batch_index):
        if batch_index == 3:
            raise ValueError("reward exploded")
        return StubBatch(batch_index, engine.version)

    source = ThreadedRollouts(engine, produce, "bounded", 2, total_batches=10)
    with pytest.raises(RolloutWorkerError, match="reward exploded"):
        for step in range(10):
            source.next_batch()
            source.publish({"w": torch.tensor(step + 1)}, step + 1)
    source.close()


def test_close_unblocks_a_waiting_worker():
    engine = StubEngine()
    source = ThreadedRollouts(engine, make_producer(engine, lambda: 0), "exact", 0, total_batches=5)
    source.next_batch()  # the worker now waits for version 1, which never comes
    source.close()
    assert not source._thread.is_alive()
    assert threading.active_count() >= 1


def test_lag_contract_helpers():
    assert [required_version(i, 3) for i in range(6)] == [0, 0, 0, 0, 1, 2]
    assert check_lag("exact", 3, 5, 2) == 3
    assert check_lag("bounded", 3, 5, 4) == 1
    with pytest.raises(RuntimeError, match="staleness violated"):
        check_lag("exact", 3, 5, 3)
    with pytest.raises(RuntimeError, match="staleness violated"):
        check_lag("bounded", 3, 5, 1)


def _take_two_versions(mailbox):  # a worker process: takes theta_0, then waits for theta_1
    engine = StubEngine()
    mailbox.load_into(engine, 0, block=True)
    mailbox.load_into(engine, 1, block=True)


def test_a_worker_process_killed_while_it_waits_for_weights_does_not_hang_the_learner():
    """A multiprocessing Condition's notify waits until every process asleep on it wakes: a worker
    killed while it waited for weights left the learner's next publish waiting forever."""
    from stalerl import forking
    from stalerl.process_rollouts import _EMPTY, SharedWeightMailbox
    from stalerl.staleness import WorkerLost

    context = forking.context()
    mailbox = SharedWeightMailbox({"w": torch.tensor(0)}, 0, deliver_every_version=True, context=context)
    worker = context.Process(target=_take_two_versions, args=(mailbox,), daemon=True)
    worker.start()
    outcome = []

    def learner():
        mailbox.publish({"w": torch.tensor(1)}, 1, worker.is_alive)  # the slot is free: staged at once
        try:
            mailbox.publish({"w": torch.tensor(2)}, 2, worker.is_alive)  # theta_1 is never taken
        except WorkerLost as error:
            outcome.append(error)

    deadline = time.monotonic() + 60
    while mailbox._slot.value != _EMPTY:  # the worker took theta_0 ...
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.01)
    time.sleep(0.5)  # ... and waits for theta_1
    worker.kill()
    worker.join()
    thread = threading.Thread(target=learner, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the learner hangs on a dead worker"
    assert outcome and "exited before taking the learner's weights" in str(outcome[0])
