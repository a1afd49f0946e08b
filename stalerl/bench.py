"""``stalerl bench``: stalerl measured side by side with its peers, on this machine, in one run.

    stalerl bench --out DIR            # the full suite, several minutes on 2 CPU cores
    stalerl bench --out DIR --quick    # a smoke version: tiny step counts, one repeat

Writes DIR/bench.json and prints a table. Every timed run is a fresh process (spawned, one torch
thread unless said otherwise), so runs do not share allocator state and each one's peak RSS is its
own. Variants alternate within each repeat so machine noise hits all; medians are reported.

* step:   one GRPO step of stalerl at S = 0 vs TRL's GRPOTrainer on the same work (bench_trl.py),
          stalerl running every sequence whole, prompt included (model.share_prompt_prefix=false),
          and stalerl skipping the padding after short responses (optim.skip_padding=true)
* gen:    TransformersEngine.generate vs a plain ``model.generate(do_sample=True)`` on the same batch,
          and the engine with every row's prompt prefilled
* async:  steps/s at S = 1, 2, 4 vs S = 0 against the ideal overlap (t_gen + t_train) / max(t_gen, t_train),
          t_gen being the rollout side's time per batch (sampling, reward, weight load)
* sweep:  12 cells of the embedded default with 2 workers vs the same cells one at a time
* memory: peak RSS against S (exact mode) and against the batch size

With ``--model DIR`` (a Hugging Face checkpoint, or ``random:llama-3.2-1b`` for that shape with
random weights) and ``--data FILE`` the gen and async parts time that model on the math task, on a
GPU where there is one; the other parts time the embedded default only:

    stalerl bench --out DIR --model random:llama-3.2-1b --data data/gsm8k_sample.jsonl
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stalerl.config import TrainConfig, override, validate

WARMUP_STEPS = 3  # allocator and cache warm-up: not timed
OFF_STEADY = 0.10  # an async row whose rate is this far off sides_rate() is flagged in the table


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to run; `quick` and `full` are the two presets."""

    repeats: int
    step_steps: int  # steps per run in the stalerl-vs-TRL comparison (the first WARMUP_STEPS are not timed)
    gen_calls: int  # timed generate calls per engine and repeat
    async_steps: int
    async_staleness: tuple[int, ...]
    sweep_cells: int  # the first N cells of S {0,1,2,4} x lr {1e-4, 3e-4, 1e-3}
    sweep_steps: int
    memory_staleness: tuple[int, ...]
    memory_prompts: tuple[int, ...]
    # The async runs again with the rollout worker in a process of its own (runtime.local_worker).
    async_process: bool = True
    # A wider embedded Llama for the memory runs, so that a copy of the weights stands out of the
    # interpreter's ~0.5 GB; its warm start is one step (the reward does not matter for memory).
    memory_model: dict = dataclasses.field(default_factory=lambda: {
        "model.hidden_size": 512, "model.intermediate_size": 1536, "model.num_layers": 4, "warm_start.steps": 1})


# quick: a smoke test of every part (its figures are not measurements): 4 sweep cells, not 12.
QUICK = Plan(repeats=1, step_steps=6, gen_calls=3, async_steps=8, async_staleness=(1, 2, 4), sweep_cells=4,
             sweep_steps=2, memory_staleness=(0, 4), memory_prompts=(16, 64))
FULL = Plan(repeats=3, step_steps=25, gen_calls=10, async_steps=50, async_staleness=(1, 2, 4), sweep_cells=12,
            sweep_steps=40, memory_staleness=(0, 1, 4, 16), memory_prompts=(16, 32, 64))
# A checkpoint (--model): only gen and async run, and a 1B model's step takes seconds, not 0.1 s.
CHECKPOINT = dataclasses.replace(FULL, repeats=1, gen_calls=3, async_steps=8, async_staleness=(1, 2))
CHECKPOINT_QUICK = dataclasses.replace(QUICK, gen_calls=1, async_steps=5, async_staleness=(1,))
CHECKPOINT_PARTS = ("gen", "async")
# The math task on a checkpoint: a GSM8K-like batch of P x G = 64 sequences, 128 new tokens each.
# A few validation prompts only: train() scores them once before the first step.
CHECKPOINT_DEFAULTS = {"task.name": "math", "task.val_size": 8, "rollout.prompts_per_step": 8,
                       "rollout.max_new_tokens": 128}


def base_config(**changes: Any) -> TrainConfig:
    """The embedded default as the bench times it: no validation, TensorBoard, progress bar or checkpoints."""
    values = {"val_every": 10**9, "progress": False, "tensorboard": False, "threads": 1, "checkpoint.every": 0}
    return validate(override(TrainConfig(), values | changes))


# ---------------------------------------------------------------- isolation


def _measured(parent_pid: int, function: Callable[..., dict], *args: Any) -> dict:
    from stalerl.guards import exit_with_parent

    # A killed bench would leave its pool worker behind, still running a timed run (a 1B model's, say)
    # and holding the terminal's or a pipe's output open.
    exit_with_parent(parent_pid, "stalerl-exit-with-parent")
    result = function(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def isolated(function: Callable[..., dict], *args: Any) -> dict:
    """Runs function(*args) in a fresh interpreter, which ends with this one; its result gets the
    process's peak RSS."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measured, os.getpid(), function, *args).result()


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


# ---------------------------------------------------------------- in the child processes


def train_run(config_data: dict, warmup: int) -> dict:
    """One stalerl run; per-step loop time wait_s + train_s (the learner's clock) after `warmup` steps."""
    from stalerl.config import from_dict
    from stalerl.metrics import read_metrics
    from stalerl.train import train

    config = from_dict(TrainConfig, config_data)
    summary = train(config)
    rows = read_metrics(Path(config.out))[warmup:]
    loop_s = [row["wait_s"] + row["train_s"] for row in rows]
    return {
        "s_per_step": statistics.median(loop_s),
        "steps_per_s": len(rows) / sum(loop_s),
        "gen_s": statistics.median(row["gen_s"] for row in rows),
        # what the rollout side spends per batch: sampling, scoring and loading the newest weights
        "rollout_s": statistics.median(row["gen_s"] + row["reward_s"] + row["weight_sync_s"] for row in rows),
        "weight_sync_s": statistics.median(row["weight_sync_s"] for row in rows),
        "train_s": statistics.median(row["train_s"] for row in rows),
        "wall_s": summary["wall_s"],
        "steps_timed": len(rows),
    }


def generation_run(config_data: dict, calls: int, static_cache: bool = False) -> dict:
    """The same batch through stalerl's engine and a plain sampled generate, alternating; tokens/s.

    static_cache: both with a static KV cache instead (compiled decoding on a GPU); the first,
    untimed call of each then includes the compilation, reported as first_call_s.
    """
    import numpy as np
    import torch

    from stalerl.config import from_dict
    from stalerl.data import build_task
    from stalerl.policy import build_policy, build_rollout_engine

    config = from_dict(TrainConfig, config_data)
    torch.set_num_threads(config.threads)
    model, tokenizer, _ = build_policy(config)
    task = build_task(config, tokenizer)
    rollout = config.rollout
    prompts = task.sample_prompts(np.random.default_rng([config.seed, 0]), rollout.prompts_per_step)
    texts = [prompt.text for prompt in prompts for _ in range(rollout.group_size)]

    def engine_call(changes: dict) -> Callable[[int], int]:
        engine = build_rollout_engine(override(config, changes), model, tokenizer)
        return lambda seed: int(engine.generate(texts, noise_seed=seed).response_mask_N_L.sum())

    @torch.no_grad()
    def plain_call(seed: int) -> int:  # what a user writes: tokenize, sample, decode
        torch.manual_seed(seed)
        encoded = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        sequences = model.generate(**encoded, do_sample=True, temperature=rollout.temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=rollout.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id,
                                   cache_implementation="static" if static_cache else None)
        response = sequences[:, encoded["input_ids"].shape[1]:]
        tokenizer.batch_decode(response, skip_special_tokens=True)
        is_eos = response == tokenizer.eos_token_id  # real tokens: up to and including the first eos
        return int((is_eos.long().cumsum(dim=1) - is_eos.long() == 0).sum())

    model.eval()
    # Each variant sets the cache and prompt sharing itself, whatever --set says (that is for async).
    if static_cache:
        calls_by_name = {"stalerl_static_cache": engine_call({"rollout.static_cache": True,
                                                              "model.share_prompt_prefix": True}),
                         "plain_generate_static_cache": plain_call}
    else:  # the engine as it runs by default; with every row's prompt prefilled, as plain generate does
        calls_by_name = {"stalerl": engine_call({"rollout.static_cache": False, "model.share_prompt_prefix": True}),
                         "stalerl_whole_prompts": engine_call({"rollout.static_cache": False,
                                                               "model.share_prompt_prefix": False}),
                         "plain_generate": plain_call}
    timings: dict[str, list[tuple[float, int]]] = {name: [] for name in calls_by_name}
    first_call_s = {}
    for call in range(calls + 1):  # call 0 warms them up
        for name, function in calls_by_name.items():
            start = time.perf_counter()
            tokens = function(1000 + call)
            if call:
                timings[name].append((time.perf_counter() - start, tokens))
            else:
                first_call_s[name] = time.perf_counter() - start
    return {name: {"s_per_call": statistics.median(s for s, _ in rows),
                   "tokens_per_s": sum(t for _, t in rows) / sum(s for s, _ in rows),
                   "first_call_s": first_call_s[name]}
            for name, rows in timings.items()}


def memory_run(config_data: dict, cycle_history: bool) -> dict:
    """A run for its peak RSS; `cycle_history=False` turns off the learner's cycle-drift history
    (metrics.py keeps the last S parameter vectors for it), leaving what the pipeline itself holds."""
    import stalerl.metrics
    from stalerl.config import from_dict
    from stalerl.train import train

    if not cycle_history:
        stalerl.metrics.MAX_CYCLE_HISTORY_FLOATS = 0
    summary = train(from_dict(TrainConfig, config_data))
    return {"weight_mb": summary["warm_start"]["parameters"] * 4 / 2**20}  # float32 on CPU


# ---------------------------------------------------------------- the measurements


def bench_step(plan: Plan, tmp: Path, log: Callable[[str], None]) -> dict:
    from stalerl.bench_trl import DIFFERENCES, trl_steps, trl_version

    config = base_config(steps=plan.step_steps)
    have_trl = trl_version() is not None
    if not have_trl:
        log("TRL is not installed: skipping the GRPOTrainer comparison (pip install 'stalerl[bench]')")
    ours, whole, skipped, theirs = [], [], [], []
    for repeat in range(plan.repeats):
        ours.append(isolated(train_run, override(config, {"out": str(tmp / f"step-r{repeat}")}).to_dict(),
                             WARMUP_STEPS))
        # stalerl with every sequence run whole, as before prefix.py: what sharing a group's prompt saves
        whole.append(isolated(train_run, override(config, {"out": str(tmp / f"step-whole-r{repeat}"),
                                                           "model.share_prompt_prefix": False}).to_dict(),
                              WARMUP_STEPS))
        skipped.append(isolated(train_run, override(config, {"out": str(tmp / f"step-skip-r{repeat}"),
                                                             "optim.skip_padding": True}).to_dict(),
                                WARMUP_STEPS))
        if have_trl:
            theirs.append(isolated(trl_steps, config.to_dict(), plan.step_steps, WARMUP_STEPS))
    samples = config.rollout.prompts_per_step * config.rollout.group_size

    def side(runs: list[dict]) -> dict:
        seconds = median_of(runs, "s_per_step")
        return {"s_per_step": seconds, "samples_per_s": samples / seconds, "peak_rss_mb": median_of(runs, "peak_rss_mb"),
                "runs": runs}

    result = {"samples_per_step": samples, "stalerl": side(ours), "stalerl_whole_prompts": side(whole),
              "stalerl_skip_padding": side(skipped), "trl": side(theirs) if have_trl else None,
              "trl_version": trl_version(), "differences": DIFFERENCES if have_trl else []}
    result["ratio_trl_over_stalerl"] = (result["trl"]["s_per_step"] / result["stalerl"]["s_per_step"]
                                        if have_trl else None)
    result["prompt_sharing_speedup"] = result["stalerl_whole_prompts"]["s_per_step"] / result["stalerl"]["s_per_step"]
    result["skip_padding_speedup"] = result["stalerl"]["s_per_step"] / result["stalerl_skip_padding"]["s_per_step"]
    result["ratio_trl_over_stalerl_skip_padding"] = (result["trl"]["s_per_step"]
                                                     / result["stalerl_skip_padding"]["s_per_step"] if have_trl else None)
    return result


def bench_generation(plan: Plan, model: dict, with_static_cache: bool) -> dict:
    """with_static_cache (a model on a GPU): also both sides with a static KV cache, where
    transformers compiles the decoding step (rollout.static_cache); a failure there is reported."""
    config = base_config(**model)
    runs = [isolated(generation_run, config.to_dict(), plan.gen_calls) for _ in range(plan.repeats)]
    names = ["stalerl", "stalerl_whole_prompts", "plain_generate"]
    if with_static_cache:
        try:
            static = [isolated(generation_run, config.to_dict(), plan.gen_calls, True) for _ in range(plan.repeats)]
            runs = [{**run, **static_run} for run, static_run in zip(runs, static)]
            names += ["stalerl_static_cache", "plain_generate_static_cache"]
        except Exception as error:  # noqa: BLE001 - the dynamic-cache figures stand without it
            runs = [{**run, "static_cache_error": f"{type(error).__name__}: {error}"} for run in runs]
    result = {name: {key: statistics.median(run[name][key] for run in runs)
                     for key in ("s_per_call", "tokens_per_s", "first_call_s")} for name in names}
    result["batch"] = config.rollout.prompts_per_step * config.rollout.group_size
    result["max_new_tokens"] = config.rollout.max_new_tokens
    result["ratio_stalerl_over_plain"] = result["stalerl"]["tokens_per_s"] / result["plain_generate"]["tokens_per_s"]
    result["ratio_whole_prompts_over_plain"] = (result["stalerl_whole_prompts"]["tokens_per_s"]
                                                / result["plain_generate"]["tokens_per_s"])
    if "stalerl_static_cache" in result:
        static_rate = result["stalerl_static_cache"]["tokens_per_s"]
        result["ratio_static_over_plain_static"] = static_rate / result["plain_generate_static_cache"]["tokens_per_s"]
        result["ratio_static_over_stalerl"] = static_rate / result["stalerl"]["tokens_per_s"]
    if "static_cache_error" in runs[0]:
        result["static_cache_error"] = runs[0]["static_cache_error"]
    return result


# The rollout worker of an async row: a thread (the default), a process of its own, or (on a GPU)
# a thread whose kernels run on a CUDA stream of their own (runtime.rollout_cuda_stream).
WORKER_SETTINGS = {"thread": {}, "process": {"runtime.local_worker": "process"},
                   "own_stream": {"runtime.rollout_cuda_stream": "own"}}


def bench_async(plan: Plan, tmp: Path, model: dict, gpu: bool = False,
                progress: Callable[[dict], None] = lambda partial: None) -> dict:
    """The ideal overlap takes the rollout side's whole time per batch (sampling, reward, weight load).
    Rows for S >= 1 come again with `plan.async_process`, the rollout worker in a process of its
    own, and on a GPU with the thread on a CUDA stream of its own; a run of those that fails is
    reported (`<worker>_worker_error`), and the thread rows stand. After each run, `progress` gets
    the part as far as it goes (`unfinished`: runs done and planned), so a bench killed at a time
    limit (a GPU session's) keeps the runs it finished."""
    staleness = (0, *plan.async_staleness)
    workers = ["thread"] + ["process"] * plan.async_process + ["own_stream"] * gpu
    # Alternating within each repeat: S = 0, then each S >= 1 with every worker in turn.
    planned = [(repeat, s, worker) for repeat in range(plan.repeats) for s in staleness
               for worker in (workers if s > 0 else ["thread"])]
    runs: dict[tuple[int, str], list[dict]] = {}
    errors: dict[str, str] = {}
    for done, (repeat, s, worker) in enumerate(planned, start=1):
        if worker in errors:
            continue
        config = base_config(steps=plan.async_steps, **model,
                             **{"staleness.staleness": s, **WORKER_SETTINGS[worker],
                                "out": str(tmp / f"async-S{s}-{worker}-r{repeat}")})
        try:
            runs.setdefault((s, worker), []).append(isolated(train_run, config.to_dict(), WARMUP_STEPS))
        except Exception as failure:  # noqa: BLE001 - only the thread rows are needed
            if worker == "thread":
                raise
            errors[worker] = f"{type(failure).__name__}: {failure}"
        if done < len(planned):
            progress(async_summary(runs, errors, plan.async_steps) | {"unfinished": [done, len(planned)]})
    return async_summary(runs, errors, plan.async_steps)


def async_summary(runs: dict[tuple[int, str], list[dict]], errors: dict[str, str], steps: int) -> dict:
    """The async part from the runs so far (the S = 0 thread run comes first): medians per row."""
    sync = runs[(0, "thread")]
    t_gen, t_train = median_of(sync, "rollout_s"), median_of(sync, "train_s")
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    sync_rate = median_of(sync, "steps_per_s")
    rows = []
    for (s, worker), timed in runs.items():
        if worker in errors:
            continue
        rate = median_of(timed, "steps_per_s")
        speedup = rate / sync_rate
        # each side's time while they overlap: what the overlap cost them
        rollout_s, train_s = median_of(timed, "rollout_s"), median_of(timed, "train_s")
        rows.append({"S": s, "worker": worker, "steps_per_s": rate, "speedup": speedup,
                     "fraction_of_ideal": speedup / ideal,
                     "share_of_ideal_gain": (speedup - 1) / (ideal - 1) if ideal > 1 else None,
                     "rollout_s": rollout_s, "train_s": train_s, "weight_sync_s": median_of(timed, "weight_sync_s"),
                     "sides_steps_per_s": sides_rate(s, rollout_s, train_s),
                     "wall_s": median_of(timed, "wall_s")})  # the whole run: start-up and validation too
    result = {"t_gen_s": t_gen, "t_train_s": t_train, "ideal_overlap": ideal, "threads_per_process": 1,
              "t_sample_s": median_of(sync, "gen_s"), "weight_sync_s": median_of(sync, "weight_sync_s"),
              "steps": steps, "rows": rows}
    for worker, error in errors.items():
        result[f"{worker}_worker_error"] = error
    return result


def sides_rate(staleness: int, rollout_s: float, train_s: float) -> float:
    """The steady rate that a run's median batch and step times allow: one after the other at S = 0,
    the slower side alone at S >= 1. A measured rate well off it says the timed steps were no steady
    state: an outlier step (a recompilation, say) below it, the rollout side's head start of up to S
    queued batches above it (a few timed steps of a rollout-bound run)."""
    return 1 / (rollout_s + train_s) if staleness == 0 else 1 / max(rollout_s, train_s)


def bench_sweep(plan: Plan, tmp: Path) -> dict:
    """12 cells one at a time vs 2 at a time (`stalerl sweep --workers 2`), alternated, `repeats` times.

    Each run's summary has its wall time and its CPU time (all threads). A single run with S >= 1
    already uses more than one core (its rollout thread overlaps the learner), so the sweep can at
    best reach (CPU-seconds of its runs / cores) / (sum of single-run walls): `bound` below.
    """
    from stalerl.lab.sweep import cell_configs, run_sweep

    base = base_config(steps=plan.sweep_steps)
    timings: dict[int, list[dict]] = {1: [], 2: []}
    for repeat in range(plan.repeats):
        for workers in (1, 2):
            out = tmp / f"sweep-w{workers}-{repeat}"
            cells = cell_configs(base, out, [0, 1, 2, 4], [1e-4, 3e-4, 1e-3], [0], ["none"])[: plan.sweep_cells]
            start = time.perf_counter()
            run_sweep(cells, out, workers, progress=False)
            wall = time.perf_counter() - start
            summaries = [json.loads((Path(config.out) / "summary.json").read_text()) for _, config in cells]
            timings[workers].append({"wall_s": wall, "sum_of_runs_s": sum(s["wall_s"] for s in summaries),
                                     "sum_of_runs_cpu_s": sum(s["cpu_s"] for s in summaries)})
    serial_wall, runs_s = median_of(timings[1], "wall_s"), median_of(timings[1], "sum_of_runs_s")
    parallel, parallel_cpu = median_of(timings[2], "wall_s"), median_of(timings[2], "sum_of_runs_cpu_s")
    # What 2 workers can use: each run has a learner and a rollout thread of one torch thread each.
    cores = min(2 * 2, os.cpu_count() or 1)
    return {"cells": plan.sweep_cells, "steps": plan.sweep_steps, "workers": 2, "repeats": plan.repeats,
            "serial_wall_s": serial_wall, "sum_of_single_runs_s": runs_s,
            "single_runs_cores_used": median_of(timings[1], "sum_of_runs_cpu_s") / runs_s,
            "parallel_wall_s": parallel, "parallel_runs_cpu_s": parallel_cpu,
            "parallel_over_sum_of_runs": parallel / runs_s,
            "bound": parallel_cpu / cores / runs_s,
            "core_utilisation": parallel_cpu / (cores * parallel),
            "parallel_over_serial_wall": parallel / serial_wall, "runs": timings}


def bench_memory(plan: Plan, tmp: Path) -> dict:
    from stalerl.metrics import MAX_CYCLE_HISTORY_FLOATS

    rows = []
    for s in plan.memory_staleness:  # exact mode, the wide model, with and without the cycle-drift history
        for history in (True, False):
            config = base_config(steps=s + 4, **{**plan.memory_model, "staleness.staleness": s,
                                                 "rollout.prompts_per_step": 4, "out": str(tmp / f"mem-S{s}-{history}")})
            run = isolated(memory_run, config.to_dict(), history)
            rows.append({"model": "wide", "S": s, "prompts": 4, "cycle_history": history, **run})
    for prompts in plan.memory_prompts:  # the default model, S = 0
        config = base_config(steps=4, **{"rollout.prompts_per_step": prompts, "out": str(tmp / f"mem-P{prompts}")})
        rows.append({"model": "default", "S": 0, "prompts": prompts, "cycle_history": True,
                     **isolated(memory_run, config.to_dict(), True)})

    def slope(points: list[tuple[float, float]]) -> float:  # least squares
        x, y = np.array(points, dtype=float).T
        return float(np.polyfit(x, y, 1)[0])

    weight_mb = rows[0]["weight_mb"]
    wide = {history: {r["S"]: r["peak_rss_mb"] for r in rows if r["model"] == "wide" and r["cycle_history"] == history}
            for history in (True, False)}
    # metrics.py keeps the cycle-drift history only while S x parameters fits its cap: a slope is
    # taken over the S values where it does (with it) and over every S (the pipeline alone).
    parameters = weight_mb * 2**20 / 4
    kept = [s for s in wide[True] if s * parameters <= MAX_CYCLE_HISTORY_FLOATS]
    with_history = slope([(s, wide[True][s]) for s in kept]) if len(kept) > 1 else None
    pipeline = slope(list(wide[False].items()))
    return {"weight_mb_wide": weight_mb, "rows": rows,
            "extra_weight_copies_by_S": {str(s): (mb - wide[False][0]) / weight_mb for s, mb in wide[False].items()},
            "mb_per_unit_S_pipeline_only": pipeline, "weight_copies_per_unit_S_pipeline_only": pipeline / weight_mb,
            "history_kept_up_to_S": max(kept),
            "weight_copies_per_unit_S_with_history": None if with_history is None else with_history / weight_mb,
            "mb_per_prompt": slope([(r["prompts"], r["peak_rss_mb"]) for r in rows if r["model"] == "default"])}


# ---------------------------------------------------------------- the suite


PARTS = ("step", "gen", "async", "sweep", "memory")
REPORT_FORMAT = 2  # bench.json's layout: one up whenever a part's fields change (kept_parts mixes only equal ones)
# What the parts vary from run to run (the gen part's variants set the cache and prompt sharing themselves).
BENCH_SETS = ("steps", "out", "staleness.staleness", "runtime.local_worker", "runtime.rollout_cuda_stream")


def checked_model_settings(checkpoint: str, data: str, settings: dict, parts: tuple[str, ...]) -> dict:
    """The config changes that the gen and async parts run under; a clear error before any work."""
    from stalerl.config import ConfigError
    from stalerl.policy import is_missing_directory
    from stalerl.random_checkpoint import shape_of

    fixed = [key for key in BENCH_SETS if key in settings]
    if fixed:
        raise ConfigError(f"--set {fixed[0]}: the bench sets it itself, run by run")
    if not checkpoint:
        if data:
            raise ConfigError("--data: needs --model (the embedded default has its own task)")
        base_config(**settings)
        return dict(settings)
    try:
        shape = shape_of(checkpoint)
    except ValueError as error:
        raise ConfigError(f"--model: {error}") from None
    if not shape and is_missing_directory(checkpoint):
        raise ConfigError(f"--model: directory not found: {checkpoint}")
    if not data or not Path(data).is_file():
        raise ConfigError(f"--data: {'file not found: ' + data if data else 'a checkpoint needs a JSONL or Parquet file'}")
    if any(part not in CHECKPOINT_PARTS for part in parts):
        raise ConfigError(f"--parts: with --model only {','.join(CHECKPOINT_PARTS)} run (the others time the "
                          f"embedded default)")
    model = CHECKPOINT_DEFAULTS | {"model.name_or_path": checkpoint, "task.data": data} | settings
    base_config(**model)
    return model


def on_gpu(model: dict) -> bool:
    """Whether the gen and async runs put the model on a GPU (the embedded default stays on CPU)."""
    from stalerl.policy import resolve_device

    return resolve_device(base_config(**model).model).type == "cuda"


def make_random_checkpoint(shape: str, path: str, data: str) -> dict:
    from stalerl.random_checkpoint import save_random_checkpoint

    save_random_checkpoint(shape, Path(path), Path(data))
    return {}


def default_plan(quick: bool, checkpoint: bool) -> Plan:
    if checkpoint:
        return CHECKPOINT_QUICK if quick else CHECKPOINT
    return QUICK if quick else FULL


def run_bench(out: Path, quick: bool, plan: Plan | None = None, parts: tuple[str, ...] = PARTS,
              log: Callable[[str], None] = print, checkpoint: str = "", data: str = "",
              settings: dict | None = None) -> dict:
    """Runs the suite, writes out/bench.json and returns it.

    checkpoint: time the gen and async parts on this Hugging Face checkpoint directory (or
    random:SHAPE) and the math task in `data`; settings: config changes for those parts.
    """
    import torch
    import transformers

    from stalerl.bench_trl import trl_version
    from stalerl.random_checkpoint import shape_of

    model = checked_model_settings(checkpoint, data, settings or {}, parts)
    plan = plan or default_plan(quick, bool(checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "quick": quick, "plan": dataclasses.asdict(plan),
        "machine": {"cpus": os.cpu_count(), "load_avg_before": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version(),
                    "gpu": gpu},
        "model": {"checkpoint": checkpoint or "embedded default", "settings": model},
    }
    report |= kept_parts(out / "bench.json", parts)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stalerl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        shape = shape_of(checkpoint)
        if shape:  # made in a child process, so that this one holds no GPU memory
            model["model.name_or_path"] = str(tmp / f"random-{shape}")
            isolated(make_random_checkpoint, shape, model["model.name_or_path"], data)
            log(f"bench: random {shape} checkpoint written in {time.perf_counter() - started:.0f} s")

        def save(partial: dict) -> None:  # a killed bench keeps what it finished
            (out / "bench.json").write_text(json.dumps(report | partial, indent=2))

        steps = {"step": lambda: bench_step(plan, tmp, log), "gen": lambda: bench_generation(plan, model, on_gpu(model)),
                 "async": lambda: bench_async(plan, tmp, model, on_gpu(model),
                                              progress=lambda unfinished: save({"async": unfinished})),
                 "sweep": lambda: bench_sweep(plan, tmp), "memory": lambda: bench_memory(plan, tmp)}
        for part in parts:
            part_start = time.perf_counter()
            report[part] = steps[part]()
            log(f"bench: {part} done in {time.perf_counter() - part_start:.0f} s")
            save({})
    report["machine"]["load_avg_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    return report


def kept_parts(path: Path, parts: tuple[str, ...]) -> dict:
    """The parts of an earlier report in the same directory that this run does not redo, so that
    `--parts` updates a report instead of replacing it; `earlier_parts` says where each came from.
    A report that is not one, or of another REPORT_FORMAT, is refused rather than overwritten."""
    from stalerl.config import ConfigError

    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a bench report ({error}); use another --out or move it away") from None
    if not isinstance(earlier, dict):
        raise ConfigError(f"{path}: not a bench report (not a JSON object); use another --out or move it away")
    others = [part for part in PARTS if part in earlier and part not in parts]
    if others and earlier.get("format") != REPORT_FORMAT:
        raise ConfigError(f"{path} is a report of another stalerl version (format {earlier.get('format', 1)}, "
                          f"this one writes {REPORT_FORMAT}): its {', '.join(others)} part(s) would be lost; "
                          f"use another --out, or move it away")
    provenance = dict(earlier.get("earlier_parts", {}))
    kept: dict[str, Any] = {part: earlier[part] for part in others}
    if others:
        kept["earlier_parts"] = {part: provenance.get(part) or {key: earlier.get(key) for key in
                                                                ("quick", "plan", "machine", "model")}
                                 for part in others}
    return kept


def format_table(report: dict) -> str:
    machine = report["machine"]
    lines = [f"stalerl bench ({'quick' if report['quick'] else 'full'}, {report['plan']['repeats']} repeat(s), "
             f"medians; {machine['cpus']} CPUs, load {machine['load_avg_before'][0]:.1f} -> "
             f"{machine['load_avg_after'][0]:.1f}; GPU {machine['gpu'] or 'none'})",
             f"model {report['model']['checkpoint']}"]
    if "step" in report:
        step = report["step"]
        ours = step["stalerl"]
        text = f"step  stalerl S=0 {ours['s_per_step']:.3f} s ({ours['samples_per_s']:.0f} samples/s)"
        if step["trl"]:
            text += (f" | TRL {step['trl_version']} GRPOTrainer {step['trl']['s_per_step']:.3f} s "
                     f"({step['trl']['samples_per_s']:.0f} samples/s) | stalerl {step['ratio_trl_over_stalerl']:.2f}x faster")
        else:
            text += " | TRL not installed (pip install 'stalerl[bench]')"
        lines.append(text)
        lines.append(f"      stalerl with prompts run whole {step['stalerl_whole_prompts']['s_per_step']:.3f} s: "
                     f"sharing a group's prompt makes the step {step['prompt_sharing_speedup']:.2f}x faster")
        if "stalerl_skip_padding" in step:  # benches before optim.skip_padding have no such runs
            text = (f"      stalerl with optim.skip_padding {step['stalerl_skip_padding']['s_per_step']:.3f} s: "
                    f"speedup over the default {step['skip_padding_speedup']:.2f}x")
            if step["trl"]:
                text += f"; over TRL {step['ratio_trl_over_stalerl_skip_padding']:.2f}x"
            lines.append(text)
    if "gen" in report:
        gen = report["gen"]
        lines.append(f"gen   stalerl engine {gen['stalerl']['tokens_per_s']:.0f} tokens/s | plain generate "
                     f"{gen['plain_generate']['tokens_per_s']:.0f} tokens/s | ratio {gen['ratio_stalerl_over_plain']:.2f}x "
                     f"(prompts prefilled whole: {gen['ratio_whole_prompts_over_plain']:.2f}x)")
        if "stalerl_static_cache" in gen:
            lines.append(f"      static cache (compiled decoding): stalerl engine {gen['stalerl_static_cache']['tokens_per_s']:.0f} "
                         f"tokens/s, first call {gen['stalerl_static_cache']['first_call_s']:.0f} s | plain generate "
                         f"{gen['plain_generate_static_cache']['tokens_per_s']:.0f} tokens/s | ratio "
                         f"{gen['ratio_static_over_plain_static']:.2f}x; {gen['ratio_static_over_stalerl']:.2f}x the dynamic-cache engine")
        elif "static_cache_error" in gen:
            lines.append(f"      static cache (compiled decoding) failed: {gen['static_cache_error']}")
    if "async" in report:
        pipe = report["async"]
        def cells(worker: str) -> str:
            return ", ".join(f"S={row['S']} {row['steps_per_s']:.2f}/s {row['speedup']:.2f}x "
                             f"({row['fraction_of_ideal']:.0%} of ideal)" for row in pipe["rows"]
                             if row.get("worker", "thread") == worker and (worker == "thread" or row["S"] > 0))
        lines.append(f"async ideal {pipe['ideal_overlap']:.2f}x (t_gen {pipe['t_gen_s']:.3f} s, of which sampling "
                     f"{pipe['t_sample_s']:.3f} s and weight sync {pipe['weight_sync_s'] * 1e3:.1f} ms; "
                     f"t_train {pipe['t_train_s']:.3f} s): {cells('thread')}")
        if any(row.get("worker") == "process" for row in pipe["rows"]):
            walls = {(row["S"], row["worker"]): row["wall_s"] for row in pipe["rows"]}
            start_up = statistics.median(walls[(s, "process")] - walls[(s, "thread")]
                                         for s, worker in walls if worker == "process")
            lines.append(f"      rollout worker in a process: {cells('process')}; each run {start_up:+.1f} s "
                         f"of wall time against the thread's (start-up)")
        elif "process_worker_error" in pipe:
            lines.append(f"      rollout worker in a process failed: {pipe['process_worker_error']}")
        if any(row.get("worker") == "own_stream" for row in pipe["rows"]):
            lines.append(f"      rollout thread on a CUDA stream of its own: {cells('own_stream')}")
        elif "own_stream_worker_error" in pipe:
            lines.append(f"      rollout thread on a CUDA stream of its own failed: {pipe['own_stream_worker_error']}")
        if "unfinished" in pipe:
            lines.append(f"      unfinished: the bench stopped after {pipe['unfinished'][0]} of its "
                         f"{pipe['unfinished'][1]} async runs")
        off = [row for row in pipe["rows"] if "sides_steps_per_s" in row
               and abs(row["steps_per_s"] / row["sides_steps_per_s"] - 1) > OFF_STEADY]
        if off:
            lines.append("      not steady (rate against what its median batch and step allow): " + ", ".join(
                f"S={row['S']} {row.get('worker', 'thread')} {row['steps_per_s']:.2f}/s against "
                f"{row['sides_steps_per_s']:.2f}/s" for row in off) + "; time more steps: --async-steps")
    if "sweep" in report:
        sweep = report["sweep"]
        lines.append(f"sweep {sweep['cells']} cells x {sweep['steps']} steps: 2 workers {sweep['parallel_wall_s']:.0f} s "
                     f"vs sum of single runs {sweep['sum_of_single_runs_s']:.0f} s "
                     f"({sweep['parallel_over_sum_of_runs']:.0%}; bound {sweep['bound']:.0%}: single runs use "
                     f"{sweep['single_runs_cores_used']:.2f} cores each); cores busy {sweep['core_utilisation']:.0%}; "
                     f"serial wall {sweep['serial_wall_s']:.0f} s")
    if "memory" in report:
        memory = report["memory"]
        per_s = ", ".join(f"S={row['S']} {row['peak_rss_mb']:.0f} MB" for row in memory["rows"]
                          if row["model"] == "wide" and not row["cycle_history"])
        history = memory["weight_copies_per_unit_S_with_history"]
        lines.append(f"mem   wide model ({memory['weight_mb_wide']:.0f} MB of weights), exact mode, the pipeline "
                     f"alone: {per_s}; {memory['weight_copies_per_unit_S_pipeline_only']:.2f} weight copies per unit "
                     f"S; with the cycle-drift history "
                     f"{'-' if history is None else f'{history:.2f}'} per unit S up to S = "
                     f"{memory['history_kept_up_to_S']} (none kept above); "
                     f"{memory['mb_per_prompt']:.1f} MB per prompt (x G samples)")
    for part, source in report.get("earlier_parts", {}).items():
        model = (source.get("model") or {}).get("checkpoint", "embedded default")
        lines.append(f"({part}: kept from an earlier bench in this directory, "
                     f"{'quick' if source.get('quick') else 'full'}, model {model})")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def add_bench_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="speed and memory side by side with TRL and plain transformers")
    parser.add_argument("--out", required=True, help="directory for bench.json")
    parser.add_argument("--quick", action="store_true", help="a smoke version: tiny step counts, one repeat (about 2 min on 2 cores)")
    parser.add_argument("--parts", default="", help=f"comma-separated subset of {','.join(PARTS)} "
                        f"(default: all; with --model: {','.join(CHECKPOINT_PARTS)})")
    parser.add_argument("--model", default="", help="time gen and async on this Hugging Face checkpoint directory, "
                        "or random:llama-3.2-1b (that shape, random weights), on a GPU where there is one")
    parser.add_argument("--data", default="", help="with --model: the math task's JSONL or Parquet file")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every timed comparison, medians "
                        "reported (default: 3 for the full suite, 1 for --quick or --model)")
    parser.add_argument("--async-steps", type=int, default=None, help="steps of each async run, the first "
                        f"{WARMUP_STEPS} untimed (default: 50; 8 with --quick or --model, 5 with both)")
    parser.add_argument("--async-staleness", default="", metavar="S,S,...", help="the staleness of the async "
                        "rows besides S = 0 (default: 1,2,4; 1,2 with --model, 1 with --model and --quick)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field for the gen and async runs, e.g. --set rollout.max_new_tokens=256 "
                        "(repeatable; step, sweep and memory keep their fixed settings)")


def parse_async_staleness(text: str) -> tuple[int, ...]:
    """--async-staleness: comma-separated S >= 1, run in increasing order; empty: the plan's own."""
    from stalerl.config import ConfigError

    values = [part.strip() for part in text.split(",") if part.strip()]
    if not all(value.isdecimal() and int(value) >= 1 for value in values):  # isdecimal: what int() reads
        raise ConfigError(f"--async-staleness: comma-separated whole numbers >= 1 (S = 0 always runs), got {text!r}")
    return tuple(sorted({int(value) for value in values}))


def run_bench_command(args: Any) -> int:
    from stalerl.config import ConfigError, parse_assignment

    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise ConfigError(f"--parts: unknown {unknown[0]!r} (known: {', '.join(PARTS)})")
    if args.repeats is not None and args.repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1 (got {args.repeats})")
    if args.async_steps is not None and args.async_steps < WARMUP_STEPS + 2:
        raise ConfigError(f"--async-steps: must be >= {WARMUP_STEPS + 2}, the first {WARMUP_STEPS} are not timed "
                          f"(got {args.async_steps})")
    staleness = parse_async_staleness(args.async_staleness)
    settings = dict(parse_assignment(text) for text in args.set)
    plan = default_plan(args.quick, bool(args.model))
    if args.repeats is not None:  # on a noisy machine, more repeats tighten the medians
        plan = dataclasses.replace(plan, repeats=args.repeats)
    if args.async_steps is not None:  # a rollout-bound run reaches its steady rate only after its queue drains
        plan = dataclasses.replace(plan, async_steps=args.async_steps)
    if staleness:  # a device session's minutes go to the rows that matter
        plan = dataclasses.replace(plan, async_staleness=staleness)
    report = run_bench(Path(args.out), args.quick, plan=plan,
                       parts=parts or (CHECKPOINT_PARTS if args.model else PARTS),
                       log=lambda text: print(text, flush=True), checkpoint=args.model, data=args.data,
                       settings=settings)
    print(format_table(report))
    print(f"report: {Path(args.out) / 'bench.json'}")
    return 0
