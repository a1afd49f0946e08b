"""End to end on the embedded default model, shortened."""

import dataclasses
import json
import re

import pytest
import torch
import transformers

import stalerl

from stalerl.cli import main
from stalerl.config import load_config
from stalerl.metrics import read_metrics
from stalerl.train import train

TIMING_KEYS = {"gen_s", "train_s", "wait_s", "reward_s", "weight_sync_s"}
REQUIRED_KEYS = {"step", "train_reward", "val_reward", "grad_cos_sim", "update_norm", "drift", "lag_mean", "lag_max",
                 "clip_frac", "kl", "entropy", "response_len", "gen_s", "train_s"}


def with_staleness(config, mode, staleness, **changes):
    return dataclasses.replace(config, staleness=dataclasses.replace(config.staleness, mode=mode, staleness=staleness),
                               **changes)


def read_samples(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_run_directory_contents(small_config, tmp_path):
    config = with_staleness(small_config, "exact", 2)
    summary = train(config)
    run_dir = tmp_path / "run"
    assert load_config(run_dir / "config.yaml") == config
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(8))
    assert REQUIRED_KEYS <= set(rows[0])
    assert [row["val_reward"] is not None for row in rows] == [False, False, False, True] * 2
    assert rows[0]["grad_cos_sim"] is None and all(-1 <= row["grad_cos_sim"] <= 1 for row in rows[1:])
    assert all(row["update_norm"] > 0 for row in rows)
    assert [row["lag_max"] for row in rows] == [0, 1, 2, 2, 2, 2, 2, 2]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == summary
    for key in ("collapse_step", "final_val_reward", "best_val_reward", "steps", "wall_s", "cpu_s"):
        assert key in summary
    assert summary["steps"] == 8 and summary["final_val_reward"] == rows[-1]["val_reward"]
    environment = summary["environment"]  # what made the run: a rerun elsewhere can be compared with it
    assert environment["torch"] == torch.__version__ and environment["transformers"] == transformers.__version__
    assert environment["device"] == "cpu" and environment["stalerl"] == stalerl.__version__


@pytest.mark.parametrize("skip_padding", [False, True])
def test_exact_mode_same_seed_same_metrics(small_config, tmp_path, skip_padding):
    small_config = dataclasses.replace(small_config, optim=dataclasses.replace(small_config.optim,
                                                                               skip_padding=skip_padding))
    runs = []
    for name, background in (("a", True), ("b", False)):  # validation in its own thread, or on the learner's
        config = with_staleness(small_config, "exact", 2, out=str(tmp_path / name), seed=3,
                                val_in_background=background)
        train(config)
        rows = read_metrics(tmp_path / name)
        runs.append([{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows])
    assert runs[0] == runs[1]
    other = with_staleness(small_config, "exact", 2, out=str(tmp_path / "c"), seed=4)
    train(other)
    assert [r["train_reward"] for r in read_metrics(tmp_path / "c")] != [r["train_reward"] for r in runs[0]]


def test_a_process_worker_makes_the_thread_workers_run(small_config, tmp_path):
    """runtime.local_worker=process: the rollout worker in a child process, the same run bit for bit."""
    runs = {}
    for worker in ("thread", "process"):
        config = with_staleness(small_config, "exact", 3, out=str(tmp_path / worker), seed=2,
                                runtime=dataclasses.replace(small_config.runtime, local_worker=worker))
        summary = train(config)
        runs[worker] = ([{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_metrics(config.out)],
                        read_samples(tmp_path / worker))
    assert summary["rollouts"]["worker"] == "process"
    assert summary["rollouts"]["started"] == ("spawned" if torch.cuda.is_available() else "forked")
    # The child's CPU time is counted, though a forked child is not the learner's child (process_rollouts.py).
    assert summary["cpu_s"] > summary["rollouts"]["worker_cpu_s"] > 0
    assert runs["thread"] == runs["process"]
    bounded = with_staleness(small_config, "bounded", 2, out=str(tmp_path / "bounded"), steps=12,
                             runtime=dataclasses.replace(small_config.runtime, local_worker="process"))
    train(bounded)
    rows = read_samples(tmp_path / "bounded")
    assert all(0 <= row["step"] - version <= 2 for row in rows for version in row["versions"])
    ids = [i for row in rows for i in row["sample_ids"]]
    assert len(ids) == len(set(ids)) == 12 * 32


def test_a_process_worker_that_made_every_batch_ends_on_close_without_being_killed(small_config):
    """A run that ends before it reads every batch (collapse.stop_early, a guard): the child, done, waits at
    exit to flush the unread batches into its pipe. close() drains them; it used to wait 10 s, then kill it."""
    import time

    from stalerl.policy import build_policy
    from stalerl.process_rollouts import ProcessRollouts

    config = with_staleness(small_config, "exact", 4, steps=8,
                            runtime=dataclasses.replace(small_config.runtime, local_worker="process"))
    model, _, _ = build_policy(config)
    source = ProcessRollouts(config, model.state_dict())
    assert source.next_batch().batch_index == 0
    for version in (1, 2, 3):  # enough weights for every batch: 4 + 3 = 7, and batch 0 is taken
        source.publish(model.state_dict(), version)
    deadline = time.monotonic() + 60
    while source._batches.qsize() < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert source._batches.qsize() == 7  # the child has made all it can, and the learner reads no more
    source.close()
    assert source._process.exitcode == 0  # ended by itself, not SIGKILLed (-9)


def test_cpu_seconds_count_a_worker_process_that_rusage_leaves_out():
    from stalerl.train import cpu_seconds

    class ForkedWorker:  # the fork server's child: RUSAGE_CHILDREN never holds its CPU time
        def unreaped_worker_cpu_s(self) -> float:
            return 100.0

    assert 99.9 < cpu_seconds(ForkedWorker()) - cpu_seconds() < 100.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_rollout_thread_on_its_own_cuda_stream_makes_the_same_run(small_config, tmp_path, monkeypatch):
    """runtime.rollout_cuda_stream=own: the worker's kernels on a stream of their own, and the weights
    and batches handed between the two streams in order (streams.py), so with deterministic kernels
    the run is the default stream's, bit for bit. Runs on a GPU only."""
    from stalerl.rollout import RolloutWorker

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: run this test first
    streams = []  # the stream each batch was made on
    produce = RolloutWorker.produce

    def produce_noting_the_stream(worker, batch_index):
        streams.append(torch.cuda.current_stream())
        return produce(worker, batch_index)

    monkeypatch.setattr(RolloutWorker, "produce", produce_noting_the_stream)
    torch.use_deterministic_algorithms(True, warn_only=True)
    runs, made_on = {}, {}
    try:
        for name, stream in (("default", "default"), ("own", "own"), ("default-again", "default")):
            streams.clear()
            config = with_staleness(small_config, "exact", 2, out=str(tmp_path / name), seed=5, steps=12,
                                    model=dataclasses.replace(small_config.model, device="cuda"),
                                    runtime=dataclasses.replace(small_config.runtime, rollout_cuda_stream=stream))
            summary = train(config)
            assert summary["rollouts"]["cuda_stream"] == stream
            runs[name] = ([{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_metrics(config.out)],
                          read_samples(tmp_path / name))
            made_on[name] = {s == torch.cuda.default_stream() for s in streams}
    finally:
        torch.use_deterministic_algorithms(False)
    assert made_on == {"default": {True}, "own": {False}, "default-again": {True}}
    assert runs["default"] == runs["default-again"], "two default-stream runs differ: the GPU run is not deterministic"
    assert runs["own"] == runs["default"]


@pytest.mark.parametrize("staleness, dies_after, message", [
    (0, 40, r"rollout worker process exited \(code 3\) without the next batch"),  # the learner waits for batch 1
    (2, 96, r"rollout worker process exited before taking the learner's weights"),  # it publishes theta_3
])
def test_a_dead_process_worker_fails_the_run_in_one_line(small_config, tmp_path, staleness, dies_after, message):
    from stalerl.guards import RunStopped

    rewards = tmp_path / "dying_reward.py"
    rewards.write_text(
        "import multiprocessing, os\n"
        "calls = 0\n"
        "def reward(prompt, completion, **record):\n"
        "    global calls\n"
        "    calls += 1\n"
        f"    if multiprocessing.parent_process() is not None and calls > {dies_after}:  # the worker only\n"
        "        os._exit(3)\n"
        "    return 0.0\n")
    config = with_staleness(small_config, "exact", staleness,
                            task=dataclasses.replace(small_config.task, reward=f"{rewards}:reward"),
                            runtime=dataclasses.replace(small_config.runtime, local_worker="process"))
    with pytest.raises(RunStopped, match=message + "; no checkpoint was written$"):
        train(config)
    # S = 0: step 0 ran on batch 0. S = 2: steps 0 and 1 ran; step 2's publish found the worker gone.
    assert len(read_metrics(tmp_path / "run")) == (1 if staleness == 0 else 2)


def test_exact_mode_s4_every_sample_after_warmup_has_lag_4(small_config, tmp_path):
    config = with_staleness(small_config, "exact", 4, steps=14, val_every=100)
    train(config)
    rows = read_samples(tmp_path / "run")
    for row in rows:
        lags = {row["step"] - version for version in row["versions"]}
        assert lags == {min(row["step"], 4)}
    ids = [i for row in rows for i in row["sample_ids"]]
    assert len(ids) == len(set(ids))


def test_bounded_mode_end_to_end(small_config, tmp_path):
    config = with_staleness(small_config, "bounded", 2, steps=12, val_every=100)
    train(config)
    lags = [row["step"] - v for row in read_samples(tmp_path / "run") for v in row["versions"]]
    assert len(lags) == 12 * 32 and 0 <= min(lags) and max(lags) <= 2


def test_cli_runs_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--steps", "3", "--staleness", "1", "--out", str(out), "--no-progress", "--val-every", "3",
            "--set", "rollout.prompts_per_step=4", "--set", "tensorboard=true"]
    assert main(argv) == 0
    assert "3 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert re.fullmatch(rf"stalerl {stalerl.__version__}( \(git [0-9a-f]{{12}}(\+dirty)?\))?; torch "
                        rf"{re.escape(torch.__version__)}, transformers .*\n", capsys.readouterr().out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()  # all of them: the queue is flushed at the end
    rows = read_metrics(out)
    assert [(event.step, event.value) for event in events.Scalars("train_reward")] == [
        (row["step"], pytest.approx(row["train_reward"])) for row in rows]
    assert len(events.Tags()["scalars"]) > 20
    before = (out / "metrics.jsonl").read_text()
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("lr", [0.03])
def test_large_learning_rate_collapses_and_says_when(small_config, tmp_path, lr):
    config = dataclasses.replace(small_config, steps=40, val_every=20,
                                 optim=dataclasses.replace(small_config.optim, lr=lr),
                                 collapse=dataclasses.replace(small_config.collapse, window=5, min_tail=5))
    summary = train(config)
    assert summary["collapse_step"] is not None and summary["collapse_step"] < 35
    assert summary["drift_at_collapse"] > 0
