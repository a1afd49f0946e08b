"""The training loop: sample -> score -> advantages -> loss -> step -> log, with controlled staleness.

    stalerl train                      # the embedded default, a few minutes on 2 CPU cores
    stalerl train --staleness 4 --lr 1e-3 --mode exact --out runs/s4

The rollout worker runs concurrently with the learner (see staleness.py); step t consumes batch t
and logs its lag. The run directory gets config.yaml, metrics.jsonl (a line a step),
samples.jsonl (per-sample versions and rewards), summary.json and TensorBoard scalars, and
checkpoints/ every checkpoint.every steps: `stalerl train --resume RUN` goes on from the newest
(checkpoint.py), in exact mode bit for bit as if the run had never stopped.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stalerl import checkpoint
from stalerl.collapse import collapse_step, collapse_summary
from stalerl.config import ConfigError, TrainConfig, is_run_config, save_config, validate
from stalerl.learner import learner_step, make_optimizer
from stalerl.metrics import MetricsWriter, UpdateTracker, finite_or_none
from stalerl.data import build_task
from stalerl.guards import (BadStepGuard, Interrupted, RunStopped, StopRequests, Terminated, check_prompt_lengths,
                            disk_full, is_disk_full, output_directory, resume_hint)
from stalerl.policy import build_policy, build_rollout_engine, hub_access, load_tokenizer, save_final
from stalerl.preflight import check_inputs
from stalerl.provenance import environment
from stalerl.rollout import RolloutWorker, TransformersEngine, response_stop_ids
from stalerl.stabilizers import LearningRateControl, align_update
from stalerl.staleness import PipelineState, RolloutSource, ThreadedRollouts, WorkerLost, check_lag
from stalerl.tasks import Task
from stalerl.validation import Validation
from stalerl.wandb_logging import WandbRun

if TYPE_CHECKING:  # Ray loads only for runtime.runtime=ray
    from stalerl.ray_rollouts import StartedActors


def prepare_run_dir(config: TrainConfig, resume: bool = False) -> Path:
    run_dir = Path(config.out)
    if resume:
        checkpoint.check_resumable(run_dir, config)  # an unfinished run of this very config
        return run_dir
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; choose another --out")
    if (run_dir / "config.yaml").is_file() and not is_run_config(run_dir / "config.yaml"):
        raise ConfigError(f"run directory {run_dir} holds a config.yaml that stalerl did not write, and a run "
                          f"writes its own there; choose another --out")
    return output_directory(run_dir, "--out")


def entries(directory: Path) -> set[str] | None:
    """The names in `directory`, or None where it does not exist."""
    return set(os.listdir(directory)) if directory.is_dir() else None


def steps_logged(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def withdraw_refused_run(run_dir: Path, found: set[str] | None) -> None:
    """Leaves `run_dir` as it was before a run that was refused before its first step (W&B's login, a
    prompt too long for the model's context, weights that do not load): otherwise the same command,
    once fixed, is refused for "already holds a run", and a directory holding only config.yaml looks
    like a run. Only what this run made goes, and only before a step is logged."""
    for name in sorted(set(os.listdir(run_dir)) - (found or set())):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if found is None:
        run_dir.rmdir()


def build_rollout_worker(config: TrainConfig, model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                         task: Task) -> RolloutWorker:
    """The rollout side of a run: its own copy of the policy (the learner's weights reach it through
    the staleness pipeline, one version at a time), the task, and the run's seed."""
    rollout = config.rollout
    engine = build_rollout_engine(config, model, tokenizer)  # transformers or vLLM (rollout.engine)
    return RolloutWorker(engine, task, rollout.prompts_per_step, rollout.group_size, config.seed,
                         recompute_behavior=rollout.recompute_behavior_logprobs,
                         drop_failed_rewards=config.task.on_reward_error == "drop")


def build_rollout_worker_from_config(config: TrainConfig) -> RolloutWorker:
    """A rollout worker where no learner is (a Ray actor): policy and task built as train() builds them.
    A vLLM worker loads only the tokenizer: vLLM reads the weights itself, unless the learner's
    forward must recompute behavior log-probs."""
    if config.rollout.engine == "vllm" and not config.rollout.recompute_behavior_logprobs:
        tokenizer = load_tokenizer(config.model, hub_access(config.model.name_or_path))
        return build_rollout_worker(config, None, tokenizer, build_task(config, tokenizer))
    model, tokenizer, _ = build_policy(config)
    return build_rollout_worker(config, model, tokenizer, build_task(config, tokenizer))


def make_rollout_source(config: TrainConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        task: Task, start: PipelineState | None = None,
                        started_actors: StartedActors | None = None) -> RolloutSource:
    """The transport between rollout workers and learner: a thread or a process (local), or actors (ray).
    `start`: a checkpoint's pipeline; the model holds the learner's restored theta_{start.version}.
    `started_actors`: on Ray, the rollout actors if the learner actor started them already."""
    if config.runtime.runtime == "ray":
        from stalerl.ray_rollouts import rollouts_for_config  # Ray loads only when asked for

        return rollouts_for_config(config, model.state_dict(), start, started_actors)
    if config.runtime.local_worker == "process":
        from stalerl.process_rollouts import ProcessRollouts

        return ProcessRollouts(config, model.state_dict(), start)  # it builds its own policy copy
    worker = build_rollout_worker(config, model, tokenizer, task)
    if start is not None:  # resuming: the worker goes on from the learner's restored weights
        worker.engine.load_weights(model.state_dict(), start.version)
    own_stream = None
    if config.runtime.rollout_cuda_stream == "own":  # check_hardware made sure the model is on a GPU
        own_stream = torch.cuda.Stream(next(model.parameters()).device)
    return ThreadedRollouts(worker.engine, worker.produce, config.staleness.mode, config.staleness.staleness,
                            total_batches=config.steps, start=start, cuda_stream=own_stream)


def cpu_seconds(source: RolloutSource | None = None) -> float:
    """CPU time of this process's threads, of its finished child processes, and of a rollout worker
    process that they leave out: one still running, or one the fork server made (process_rollouts.py)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_s = getattr(source, "unreaped_worker_cpu_s", lambda: 0.0)()  # threads and Ray actors: none
    return time.process_time() + children.ru_utime + children.ru_stime + worker_s


def validates_in_background(config: TrainConfig, model: PreTrainedModel) -> bool:
    """val_in_background, or where it is null: on CPU yes, on a GPU no (config.py)."""
    if config.val_in_background is not None:
        return config.val_in_background
    return next(model.parameters()).device.type == "cpu"


def train(config: TrainConfig, resume: bool = False, started_actors: StartedActors | None = None) -> dict[str, Any]:
    """Runs one async GRPO run to completion and returns its summary (also in summary.json).

    `resume`: go on with the unfinished run in config.out from its newest valid checkpoint.
    `started_actors`: on Ray, rollout actors already started for this run (ray_runtime.LearnerActor).
    """
    config = validate(config)
    check_inputs(config)
    found = entries(Path(config.out))
    run_dir = prepare_run_dir(config, resume)
    if not resume:
        save_config(config, run_dir / "config.yaml")
    wandb_run = None
    try:
        wandb_run = WandbRun.start(config, run_dir, resume)  # None unless asked for; before any work: login, network
        summary = run_steps(config, run_dir, resume, wandb_run, started_actors)
    except BaseException as error:
        if wandb_run is not None:
            wandb_run.finish(error=error)
        if resume or not isinstance(error, (ConfigError, KeyboardInterrupt)) or steps_logged(run_dir):
            raise
        withdraw_refused_run(run_dir, found)
        if isinstance(error, KeyboardInterrupt):  # a stop signal before the loop took them (StopRequests)
            signal_name = "SIGTERM" if isinstance(error, Terminated) else "SIGINT"
            raise Interrupted(f"stopped by {signal_name} before the first step; nothing was kept: "
                              f"the same command starts the run again") from error
        raise
    if wandb_run is not None:
        wandb_run.finish(summary)
    return summary


def run_steps(config: TrainConfig, run_dir: Path, resume: bool, wandb_run: WandbRun | None,
              started_actors: StartedActors | None = None) -> dict[str, Any]:
    """train()'s run, once its config is checked and its directory made: components, loop, summary."""
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    # ------------------------------------------------------------ components
    model, tokenizer, warm_record = build_policy(config)  # the embedded tiny model, or model.name_or_path
    task = build_task(config, tokenizer)
    rollout = config.rollout
    check_prompt_lengths(task, tokenizer, getattr(model.config, "max_position_embeddings", None),
                         rollout.max_new_tokens)
    response_stop_ids(tokenizer, model.generation_config, rollout.stop_tokens)  # refuses a bad stop token now
    reference = copy.deepcopy(model).requires_grad_(False) if config.loss.kl_beta > 0 else None
    optimizer = make_optimizer(model, config.optim)
    tracker = UpdateTracker(model, config.staleness.staleness, optimizer,
                            on_host=config.runtime.update_geometry == "host")
    # The cap's prior for step 0: Adam's first step moves every trainable coordinate by eta. With LoRA
    # the update is measured on the merged weights, where that step has no such size: no prior.
    prior_g_upd = None if tracker.adapters else tracker.trainable_count ** 0.5
    lr_control = LearningRateControl(config.stabilizer, config.optim.lr, config.staleness.staleness,
                                     initial_g_upd=prior_g_upd)
    learner = checkpoint.Learner(model, optimizer, tracker, lr_control)

    # ------------------------------------------------------------ resume (checkpoint.py)
    restored = checkpoint.restore(run_dir, learner) if resume else None
    history = checkpoint.truncate_outputs(run_dir, restored and restored.outputs) if resume else []
    start_step = restored.step if restored else 0
    latest_checkpoint = restored.path if restored else None
    started -= restored.data["wall_s"] if restored else 0.0
    cpu_started -= restored.data.get("cpu_s", 0.0) if restored else 0.0

    writer = MetricsWriter(run_dir, config.tensorboard, purge_step=start_step if resume else None, wandb_run=wandb_run)
    background = validates_in_background(config, model)
    # In its own thread, validation gets its own tokenizer: a fast tokenizer's padding setting is the
    # object's, and the vLLM engine tokenizes without padding while this one pads (a race between them).
    val_tokenizer = copy.deepcopy(tokenizer) if background else tokenizer
    validation = Validation(model, lambda policy: TransformersEngine(policy, val_tokenizer, rollout.max_new_tokens,
                                                                     rollout.temperature, config.model.share_prompt_prefix,
                                                                     stop_tokens=rollout.stop_tokens),
                            task, task.validation_prompts(), writer, background=background)
    # theta_0's score before the rollout worker starts. Later validations run beside the rollout worker
    # when in the background: then a user reward sees their calls interleaved in an order timing decides.
    initial_val = restored.data["initial_val_reward"] if restored else validation.score_now(version=0)
    mode, staleness = config.staleness.mode, config.staleness.staleness
    source = make_rollout_source(config, model, tokenizer, task, restored.pipeline if restored else None,
                                 started_actors)
    progress = tqdm(total=config.steps, initial=start_step, desc=f"train S={staleness} {mode}",
                    disable=not config.progress, dynamic_ncols=True)
    guard = BadStepGuard(config.guard.max_bad_steps)
    stopped = None

    def save_checkpoint(steps_done: int, pipeline: PipelineState) -> Path:
        validation.flush()  # the rows held for a running validation belong before the checkpoint's offsets
        run = {"initial_val_reward": initial_val, "wall_s": time.perf_counter() - started,
               "cpu_s": cpu_seconds(source) - cpu_started, "config": config.to_dict()}
        return checkpoint.save(run_dir, steps_done, learner, pipeline, writer.position(), run, config.checkpoint.keep)

    stop_requests = StopRequests().install()  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
    try:
        for step in range(start_step, config.steps):
            # -------------------------------------------------- sample (made S steps ago)
            wait_start = time.perf_counter()
            batch = source.next_batch()
            wait_s = time.perf_counter() - wait_start
            lag = check_lag(mode, staleness, step, batch.version)

            # -------------------------------------------------- learn
            train_start = time.perf_counter()
            stats = learner_step(model, optimizer, batch, config.loss, config.optim, rollout, reference,
                                 choose_lr=lr_control.choose,
                                 share_prompts=config.model.share_prompt_prefix)
            if stats["skipped_update"] and not guard.streak:
                # The first bad step in a row: keep the state from before it, the batch in hand put back first.
                pipeline = source.snapshot(version=step)
                latest_checkpoint = save_checkpoint(step, PipelineState(pipeline.version, pipeline.next_batch,
                                                                        [batch, *pipeline.batches]))
            must_stop = guard.observe(step, stats)  # non-finite: skipped by learner_step, counted here
            decisions = lr_control.log()
            if config.stabilizer.gac_cos_threshold > 0:
                decisions |= align_update(tracker, config.stabilizer.gac_cos_threshold)
            source.publish(model.state_dict(), version=step + 1)
            geometry = tracker.after_step(model)
            updated = not stats["skipped_update"] and stats["in_loss_frac"] > 0  # learner_step applied an update
            if updated:
                lr_control.observe(geometry["update_norm"], stats["lr"])
            train_s = time.perf_counter() - train_start

            # -------------------------------------------------- log (the row waits for its validation: validation.py)
            metrics = {
                "step": step,
                "train_reward": batch.mean_reward(),
                "val_reward": None,  # theta_{step+1}'s score, every val_every steps and at the last
                **geometry,
                "g_upd": geometry["update_norm"] / stats["lr"] if updated else None,
                "lag_mean": float(lag),
                "lag_max": lag,
                "version": batch.version,
                **stats,
                **decisions,
                "gen_s": batch.gen_s,
                "train_s": train_s,
                "wait_s": wait_s,
                **batch.extras,  # the Ray runtime's worker id, attempts, lost_batches
            }
            history.append(metrics)
            validation.write(metrics, {
                "step": step,
                "sample_ids": batch.sample_ids,
                "versions": [batch.version] * len(batch.sample_ids),
                "rewards": batch.sample_rewards(),
            }, validate=(step + 1) % config.val_every == 0 or step + 1 == config.steps)
            progress.set_postfix(reward=f"{metrics['train_reward']:.3f}", lag=lag,
                                 cos="-" if geometry["grad_cos_sim"] is None else f"{geometry['grad_cos_sim']:.2f}",
                                 val="-" if validation.latest is None else f"{validation.latest:.3f}", refresh=False)
            progress.update()

            # -------------------------------------------------- checkpoint, stop
            periodic = config.checkpoint.every and (step + 1) % config.checkpoint.every == 0 and not guard.streak
            # Not when the guard stops the run: its checkpoint from before the bad steps is the one to go on from
            if (periodic or stop_requests.requested) and step + 1 < config.steps and not must_stop:
                latest_checkpoint = save_checkpoint(step + 1, source.snapshot(version=step + 1))
            if must_stop:
                raise guard.stop(run_dir, latest_checkpoint)
            if stop_requests.requested and step + 1 < config.steps:
                raise Interrupted(f"stopped by {stop_requests.requested} after step {step}; "
                                  f"{resume_hint(run_dir, latest_checkpoint)}")
            if config.collapse.stop_early and collapse_step([row["train_reward"] for row in history],
                                                            config.collapse.window, config.collapse.threshold,
                                                            config.collapse.min_tail) is not None:
                stopped = "collapse"
                break
        validation.flush()  # the last rows, once their validation is in
    except OSError as error:
        if is_disk_full(error):
            raise disk_full(error, run_dir, latest_checkpoint) from error
        raise
    except WorkerLost as error:  # killed or out of memory, not a bug: say how to go on
        raise RunStopped(f"{error}; {resume_hint(run_dir, latest_checkpoint)}") from error
    except KeyboardInterrupt as error:  # a second Ctrl-C or SIGTERM: at once, the step in progress lost
        raise Interrupted(f"interrupted at once; {resume_hint(run_dir, latest_checkpoint)}") from error
    finally:
        stop_requests.uninstall()
        progress.close()
        source.close()
        validation.close()  # after an error: the finished steps' rows still written
        writer.close()

    summary = summarize(config, history, initial_val, warm_record, wall_s=time.perf_counter() - started)
    summary["cpu_s"] = cpu_seconds(source) - cpu_started  # cores used = cpu_s / wall_s
    summary["rollouts"] = source.report()
    summary["reward_errors"] = sum(row.get("reward_errors", 0) for row in history)
    summary["skipped_updates"] = sum(row.get("skipped_update", 0) for row in history)
    summary["stopped"] = stopped  # null: ran every step; "collapse": collapse.stop_early ended it
    summary["environment"] = environment(str(next(model.parameters()).device))  # what a rerun should match
    summary["final_checkpoint"] = str(run_dir / "final")
    try:
        save_final(model, tokenizer, run_dir / "final", lora=config.model.lora_rank > 0)  # a plain HF checkpoint
        # last: it marks the run finished; JSON has no infinity (a diverged run's drift): null, as in metrics.jsonl
        (run_dir / "summary.json").write_text(json.dumps(finite_or_none(summary), indent=2))
    except OSError as error:
        if is_disk_full(error):
            raise disk_full(error, run_dir, latest_checkpoint) from error
        raise
    return summary


def summarize(config: TrainConfig, history: list[dict[str, Any]], initial_val: float, warm_record: dict,
              wall_s: float) -> dict[str, Any]:
    collapse = config.collapse
    rewards = [row["train_reward"] for row in history]
    val_rewards = [row["val_reward"] for row in history if row["val_reward"] is not None]
    return {
        "steps": len(history),
        # T_c; the batch consumed then was sampled by theta_version, the policy that had collapsed, whose
        # drift and path length are R_crit's readings; G_upd before it (collapse.collapse_summary)
        **collapse_summary(history, collapse.window, collapse.threshold, collapse.min_tail),
        "initial_val_reward": initial_val,
        "final_val_reward": val_rewards[-1] if val_rewards else None,
        "best_val_reward": max([initial_val, *val_rewards]),
        "final_train_reward": float(np.mean(rewards[-collapse.window:])) if rewards else None,
        "final_drift": history[-1]["drift"] if history else None,
        "final_path_length": history[-1]["path_length"] if history else None,
        "lag_max": max((row["lag_max"] for row in history), default=None),
        "staleness": config.staleness.staleness,
        "mode": config.staleness.mode,
        "lr": config.optim.lr,
        "seed": config.seed,
        "wall_s": wall_s,
        "warm_start": warm_record,
    }
