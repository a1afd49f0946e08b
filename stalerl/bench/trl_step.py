"""The TRL side of ``stalerl bench``: TRL's GRPOTrainer on the same CPU work as one stalerl step.

TRL is a benchmark-only extra (``pip install 'stalerl[bench]'``), never a runtime dependency: this
module imports it only inside `trl_steps`, which runs in its own process (step.py).

Made the same as stalerl's S = 0 step: the warm-started tiny Llama (saved to a temporary directory),
batch i's prompts in stalerl's order (shuffling off), P prompts x G samples a step, max_new_tokens,
temperature 1, one generation and one optimizer step per batch (no old-log-prob pass: TRL skips it
when num_iterations = 1 and gradient_accumulation_steps = 1), beta = 0 (no reference model), clip
0.2/0.2, token-mean aggregation over the batch (TRL's 'dapo'), group std scaling, AdamW with the same
betas, no weight decay, constant learning rate, grad clip, activation checkpointing as stalerl's
config has it (off; GRPOConfig's default is on), no vLLM, CPU, one torch thread, no logging, no
checkpoints. DIFFERENCES lists what could not be made equal.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from stalerl.config import TrainConfig

DIFFERENCES = [
    "sampling: TRL samples with multinomial (do_sample=True), stalerl with Gumbel-argmax from a seeded "
    "generator: the same distribution, different draws, so response lengths differ slightly",
    "TRL's group std gets +1e-4 before dividing, stalerl's +1e-6",
    "TRL runs the model in train mode and computes per-token entropy with its loss; the tiny Llama has "
    "no dropout, so the arithmetic is the same",
    "TRL's step includes its data loader, accelerate wrapping and metric bookkeeping; stalerl's includes "
    "its rollout thread hand-off, weight publish and update-geometry metrics (Grad CosSim, drift)",
    "clocks: TRL's step is the time between on_step_end callbacks; stalerl's is wait_s + train_s from "
    "metrics.jsonl (the per-step JSON line write is outside it)",
    "stalerl runs a group's prompt once and copies its KV cache to the G samples (prefix.py), in generation "
    "and in the learner's forward; TRL runs every sequence whole (its GRPOConfig has no option for it). "
    "bench.json's stalerl_whole_prompts is stalerl running them whole too",
]


def trl_version() -> str | None:
    try:
        return version("trl")
    except PackageNotFoundError:
        return None


def checkpointing_field() -> str:
    """TrainingArguments' activation-checkpointing switch: `activation_checkpointing` since transformers
    5.x deprecated `gradient_checkpointing` (gone in v6), which older versions have alone."""
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def grpo_config_kwargs(config: TrainConfig, steps: int, output_dir: str) -> dict:
    """TRL's GRPOConfig made to do stalerl's step (module doc). GRPOConfig turns activation
    checkpointing on by default, which recomputes the forward in backward: off, as stalerl runs."""
    rollout, loss, optim = config.rollout, config.loss, config.optim
    return dict(
        output_dir=output_dir, use_cpu=True, seed=config.seed, max_steps=steps, shuffle_dataset=False,
        per_device_train_batch_size=rollout.prompts_per_step * rollout.group_size, gradient_accumulation_steps=1,
        num_generations=rollout.group_size, max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature, num_iterations=1, beta=0.0, epsilon=loss.eps_low,
        epsilon_high=loss.eps_high, loss_type="dapo", scale_rewards="group" if loss.scale_by_std else "none",
        learning_rate=optim.lr, adam_beta1=optim.beta1, adam_beta2=optim.beta2, weight_decay=optim.weight_decay,
        max_grad_norm=optim.grad_clip, lr_scheduler_type="constant", warmup_steps=0, bf16=False,
        **{checkpointing_field(): config.model.gradient_checkpointing},
        report_to="none", logging_steps=10**9, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


def trl_steps(config_data: dict, steps: int, warmup: int) -> dict:
    """Runs TRL's GRPOTrainer for `steps` steps in this process; per-step seconds after `warmup`."""
    import warnings

    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from stalerl.config import from_dict
    from stalerl.data import build_task
    from stalerl.warmstart import warm_started_policy

    config = from_dict(TrainConfig, config_data)
    torch.set_num_threads(config.threads or torch.get_num_threads())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not ours to fix
    model, tokenizer, _ = warm_started_policy(config)
    task = build_task(config, tokenizer)
    rollout = config.rollout
    # stalerl's batch i is seeded by (seed, i): the same prompts, in the same order.
    prompts = [prompt for i in range(steps)
               for prompt in task.sample_prompts(np.random.default_rng([config.seed, i]), rollout.prompts_per_step)]
    dataset = Dataset.from_dict({"prompt": [p.text for p in prompts], "answer": [p.answer for p in prompts]})
    eos = tokenizer.eos_token_id

    def reward(prompts, completions, completion_ids, answer, **_):  # the addition task's: exact sum, then eos
        return [float(text == target and bool(ids) and ids[-1] == eos)
                for text, target, ids in zip(completions, answer, completion_ids)]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, *args, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        args = GRPOConfig(**grpo_config_kwargs(config, steps, f"{tmp}/out"))
        trainer = GRPOTrainer(model=tmp, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # the end-of-training metrics dict
        trainer.train()
    step_s = list(np.diff(clock.ends))[max(0, warmup - 1):]
    return {"s_per_step": statistics.median(step_s), "steps_timed": len(step_s)}
