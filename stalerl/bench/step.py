"""The bench's step part: one GRPO step of stalerl at S = 0 vs TRL's GRPOTrainer on the same work
(trl_step.py), and stalerl's step with prompts run whole and with optim.skip_padding."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stalerl.bench.plan import WARMUP_STEPS, Plan, base_config
from stalerl.bench.runs import isolated, median_of, train_run
from stalerl.config import override


def bench_step(plan: Plan, tmp: Path, log: Callable[[str], None]) -> dict:
    from stalerl.bench.trl_step import DIFFERENCES, trl_steps, trl_version

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
