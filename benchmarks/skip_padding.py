"""What `optim.skip_padding` saves where responses vary in length, as GSM8K-style responses do.

    python benchmarks/skip_padding.py [--responses 128] [--repeats 5] [--gradient-checkpointing] [--json FILE]
    python benchmarks/skip_padding.py --device cuda --shape llama-3.2-1b --responses 512 \
        --micro-batches 16 --gradient-checkpointing        # the 1B recipe's learner passes, on a GPU

The embedded default's responses are 1-6 tokens, mostly 3, so a third of its positions are padding.
Real reasoning responses vary far more: this times the learner's own gradient
(learner.surrogate_gradient: forward, GRPO loss, backward) on a batch of 8 prompts x 8 samples whose
response lengths are drawn uniformly from [L/4, L] (L = --responses; the longest is L), with a
random Llama (hidden 256, 4 layers, 4,096-token vocabulary) on one torch thread. Four ways, alternating
within each repeat: the whole batch in one pass and in micro-batches of 16 (two groups each), each
without and with skip_padding. Prints the medians (and writes them with --json).
`--gradient-checkpointing` times it as the GPU recipes run (every sequence whole, no shared prompt);
`--shape` takes a Llama shape of stalerl/random_checkpoint.py instead (bf16 on a GPU).

Where a group's prompt is shared, micro-batches keep the batch's row order, so the prompt still runs
once per micro-batch: sorting the rows by length first, so that each micro-batch is about as wide
as its rows, made micro-batches that hold most of the prompts, and the extra prompt passes cost
more than the narrower widths saved (0.75x the time without skip_padding, against 0.71x unsorted,
3 repeats). Where every row runs whole (gradient checkpointing), there is no prompt pass to
multiply, and the rows are sorted (0.73x, against 0.77x unsorted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stalerl.config import LossConfig, RolloutConfig
from stalerl.learner import surrogate_gradient
from stalerl.policy import enable_activation_checkpointing
from stalerl.random_checkpoint import SHAPES
from stalerl.rollout import Generation, RolloutBatch

PROMPTS, GROUP, PROMPT_TOKENS, VOCAB = 8, 8, 48, 4096


def synthetic_batch(response_tokens: int, vocab: int, seed: int = 0) -> RolloutBatch:
    """P x G rows: one random prompt per group, random responses of random lengths, random rewards."""
    generator = torch.Generator().manual_seed(seed)
    count = PROMPTS * GROUP
    prompts_P_T = torch.randint(3, vocab, (PROMPTS, PROMPT_TOKENS), generator=generator)
    lengths_N = torch.randint(response_tokens // 4, response_tokens + 1, (count,), generator=generator)
    lengths_N[0] = response_tokens  # the batch is as wide as its longest response
    response_mask_N_L = torch.arange(response_tokens)[None, :] < lengths_N[:, None]
    responses_N_L = torch.randint(3, vocab, (count, response_tokens), generator=generator) * response_mask_N_L
    tokens_N_T = torch.cat([prompts_P_T.repeat_interleave(GROUP, dim=0), responses_N_L], dim=1)
    attention_mask_N_T = torch.cat([torch.ones(count, PROMPT_TOKENS, dtype=torch.long),
                                    response_mask_N_L.long()], dim=1)
    generation = Generation(tokens_N_T=tokens_N_T, attention_mask_N_T=attention_mask_N_T,
                            response_mask_N_L=response_mask_N_L,
                            behavior_logprobs_N_L=-torch.rand(count, response_tokens, generator=generator) * response_mask_N_L,
                            finished_N=lengths_N < response_tokens, completions=[""] * count)
    rewards_N = torch.randint(0, 2, (count,), generator=generator).float()
    return RolloutBatch(batch_index=0, version=0, prompts=[], group_size=GROUP, generation=generation,
                        rewards_N=rewards_N, sample_ids=list(range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=128, help="max_new_tokens: the longest response")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as configs/llama-3.2-*-gsm8k.yaml")
    parser.add_argument("--micro-batches", default="0,16", help="micro_batch_size values (0: the whole batch)")
    parser.add_argument("--device", default="cpu", help="cpu (one torch thread) or cuda")
    parser.add_argument("--shape", default="", help=f"a shape of random_checkpoint.SHAPES ({', '.join(SHAPES)})")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    micro_batches = [int(value) for value in args.micro_batches.split(",")]
    device = torch.device(args.device)
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    torch.manual_seed(0)
    fields = SHAPES[args.shape] if args.shape else {
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 1024}
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.eval()
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    batch = synthetic_batch(args.responses, fields["vocab_size"])
    rollout = RolloutConfig(max_new_tokens=args.responses)
    ways = {(micro, skip): f"micro-batch {micro or 'whole'}, skip_padding={skip}"
            for micro in micro_batches for skip in (False, True)}
    seconds: dict[tuple[int, bool], list[float]] = {way: [] for way in ways}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up
        for micro, skip in ways:
            start = time.perf_counter()
            surrogate_gradient(model, batch, LossConfig(), micro, rollout, skip_padding=skip)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:
                seconds[(micro, skip)].append(time.perf_counter() - start)
    fill = float(batch.generation.response_mask_N_L.float().mean())
    print(f"{args.shape or 'hidden 256, 4 layers'} on {device}: "
          f"{PROMPTS * GROUP} rows, prompts {PROMPT_TOKENS} tokens, responses up to {args.responses} "
          f"({fill:.0%} of the response positions are real tokens)"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; medians of {args.repeats} repeats:")
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    for (micro, skip), name in ways.items():
        ratio = medians[(micro, skip)] / medians[(micro, False)]
        print(f"  {name:<40} {medians[(micro, skip)]:.3f} s" + (f"  ({ratio:.2f}x the time)" if skip else ""))
    if args.json:
        args.json.write_text(json.dumps({"shape": fields, "device": str(device), "responses": args.responses,
                                         "real_fraction": fill, "repeats": args.repeats,
                                         "gradient_checkpointing": args.gradient_checkpointing,
                                         "seconds": {name: seconds[way] for way, name in ways.items()},
                                         "median_s": {name: medians[way] for way, name in ways.items()}}, indent=1))


if __name__ == "__main__":
    main()
