"""The training loop: sample -> score -> advantages -> loss -> step -> log, with controlled staleness.

    stalerl train                      # the embedded default, a few minutes on 2 CPU cores
    stalerl train --staleness 4 --lr 1e-3 --mode exact --out runs/s4

The rollout worker runs concurrently with the learner (see staleness.py); step t consumes batch t
and logs its lag. The run directory gets config.yaml, metrics.jsonl (a line a step),
samples.jsonl (per-sample versions and rewards), summary.json and TensorBoard scalars.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stalerl.collapse import collapse_step
from stalerl.config import ConfigError, TrainConfig, save_config, validate
from stalerl.learner import learner_step, make_optimizer
from stalerl.metrics import MetricsWriter, UpdateTracker
from stalerl.rollout import RolloutWorker, TransformersEngine
from stalerl.staleness import ThreadedRollouts, check_lag
from stalerl.tasks import AdditionTask
from stalerl.warmstart import accuracy, warm_started_policy


def prepare_run_dir(config: TrainConfig) -> Path:
    run_dir = Path(config.out)
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create run directory {run_dir}: {error.strerror}") from None
    return run_dir


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs one async GRPO run to completion and returns its summary (also in summary.json)."""
    config = validate(config)
    run_dir = prepare_run_dir(config)
    save_config(config, run_dir / "config.yaml")
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    # ------------------------------------------------------------ components
    model, tokenizer, warm_record = warm_started_policy(config)
    task = AdditionTask(config.task.max_operand, config.task.val_size)
    rollout = config.rollout
    # The rollout worker samples with its own copy of the policy; the learner's weights reach it
    # through the staleness pipeline, one version at a time.
    engine = TransformersEngine(copy.deepcopy(model), tokenizer, rollout.max_new_tokens, rollout.temperature)
    worker = RolloutWorker(engine, task, rollout.prompts_per_step, rollout.group_size, config.seed)
    validator = TransformersEngine(model, tokenizer, rollout.max_new_tokens, rollout.temperature)
    reference = copy.deepcopy(model).requires_grad_(False) if config.loss.kl_beta > 0 else None
    optimizer = make_optimizer(model, config.optim)
    tracker = UpdateTracker(model, config.staleness.staleness)
    validation_prompts = task.validation_prompts()
    initial_val = accuracy(validator, task, validation_prompts, noise_seed=None)

    mode, staleness = config.staleness.mode, config.staleness.staleness
    source = ThreadedRollouts(engine, worker.produce, mode, staleness, total_batches=config.steps)
    writer = MetricsWriter(run_dir, config.tensorboard)
    progress = tqdm(total=config.steps, desc=f"train S={staleness} {mode}", disable=not config.progress,
                    dynamic_ncols=True)
    history: list[dict[str, Any]] = []
    try:
        for step in range(config.steps):
            # -------------------------------------------------- sample (made S steps ago)
            wait_start = time.perf_counter()
            batch = source.next_batch()
            wait_s = time.perf_counter() - wait_start
            lag = check_lag(mode, staleness, step, batch.version)

            # -------------------------------------------------- learn
            train_start = time.perf_counter()
            stats = learner_step(model, optimizer, batch, config.loss, config.optim, rollout.temperature, reference)
            source.publish(model.state_dict(), version=step + 1)
            geometry = tracker.after_step(model)
            train_s = time.perf_counter() - train_start

            val_reward = None
            if (step + 1) % config.val_every == 0 or step + 1 == config.steps:
                val_reward = accuracy(validator, task, validation_prompts, noise_seed=None)

            # -------------------------------------------------- log
            metrics = {
                "step": step,
                "train_reward": float(batch.rewards_N.mean()),
                "val_reward": val_reward,
                **geometry,
                "g_upd": geometry["update_norm"] / config.optim.lr,
                "lag_mean": float(lag),
                "lag_max": lag,
                "version": batch.version,
                **stats,
                "gen_s": batch.gen_s,
                "train_s": train_s,
                "wait_s": wait_s,
            }
            history.append(metrics)
            writer.write(metrics, {
                "step": step,
                "sample_ids": batch.sample_ids,
                "versions": [batch.version] * len(batch.sample_ids),
                "rewards": batch.rewards_N.tolist(),
            })
            progress.set_postfix(reward=f"{metrics['train_reward']:.3f}", lag=lag,
                                 cos="-" if geometry["grad_cos_sim"] is None else f"{geometry['grad_cos_sim']:.2f}",
                                 val="-" if val_reward is None else f"{val_reward:.3f}", refresh=False)
            progress.update()
    finally:
        progress.close()
        source.close()
        writer.close()

    summary = summarize(config, history, initial_val, warm_record, wall_s=time.perf_counter() - started)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(config: TrainConfig, history: list[dict[str, Any]], initial_val: float, warm_record: dict,
              wall_s: float) -> dict[str, Any]:
    collapse = config.collapse
    rewards = [row["train_reward"] for row in history]
    collapsed_at = collapse_step(rewards, collapse.window, collapse.threshold, collapse.min_tail)
    val_rewards = [row["val_reward"] for row in history if row["val_reward"] is not None]
    update_norms = np.array([row["update_norm"] for row in history])
    return {
        "steps": len(history),
        "collapse_step": collapsed_at,
        "initial_val_reward": initial_val,
        "final_val_reward": val_rewards[-1] if val_rewards else None,
        "best_val_reward": max([initial_val, *val_rewards]),
        "final_train_reward": float(np.mean(rewards[-collapse.window:])) if rewards else None,
        "drift_at_collapse": history[collapsed_at]["drift"] if collapsed_at is not None else None,
        "final_drift": history[-1]["drift"] if history else None,
        # G_upd: update size per unit learning rate, median over the steps before any collapse.
        "g_upd_median": float(np.median(update_norms[: collapsed_at or None]) / config.optim.lr)
        if len(update_norms) else None,
        "lag_max": max((row["lag_max"] for row in history), default=None),
        "staleness": config.staleness.staleness,
        "mode": config.staleness.mode,
        "lr": config.optim.lr,
        "seed": config.seed,
        "wall_s": wall_s,
        "warm_start": warm_record,
    }
