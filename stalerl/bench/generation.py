"""The bench's gen part: stalerl's engine vs a plain ``model.generate`` on the same batch, tokens/s."""

from __future__ import annotations

import statistics
import time
from typing import Callable

from stalerl.bench.plan import Plan, base_config
from stalerl.bench.runs import isolated
from stalerl.config import TrainConfig, override


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
