"""A group's prompt, computed once: GRPO's G samples of a prompt share it, so its forward pass
(keys and values) is run on the distinct prompts only and the KV cache is copied to every sample.

Both sides use it: generation prefills the distinct prompts before ``generate`` (the prompt half of
rollout time), and the learner's log-probs run the prompt block once per group, then the responses
on the copied cache; gradients flow back through the copy into the shared prompt pass. The result
equals the whole-sequence forward up to float rounding (tests/test_prefix.py checks log-probs and
gradients). vLLM does the same for its side with its prefix cache.

With `optim.skip_padding`, the learner also skips most of the padding after short responses: a
batch is as wide as its longest response, so when most responses are shorter, those rows run in a
narrower pass of their own (`length_buckets`), on the same prompt pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


def cache_argument(model: PreTrainedModel) -> str:
    """The forward's keyword for a KV cache: `cache` in newer transformers, `past_key_values` before."""
    forward = getattr(model, "get_base_model", lambda: model)().forward  # a peft wrapper: the base model's
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def activation_checkpointing(model: torch.nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def can_share(model: PreTrainedModel) -> bool:
    """Activation checkpointing turns the KV cache off in training mode: then every row runs whole."""
    return not activation_checkpointing(model)


@dataclass
class PromptGroups:
    """Rows that carry the same prompt block: row first_N_of_U[row_of_N[n]] has row n's prompt."""

    row_of_N: torch.Tensor  # [N] the distinct prompt of each row, 0 .. U-1
    first_N_of_U: torch.Tensor  # [U] the first row that carries each distinct prompt

    @property
    def saves_work(self) -> bool:
        return len(self.first_N_of_U) < len(self.row_of_N)


def prompt_groups(prompt_N_T: torch.Tensor, prompt_mask_N_T: torch.Tensor) -> PromptGroups:
    """Rows are grouped by tokens and mask together: a pad id that also occurs as a real token
    (pad = end-of-turn in some chat models) cannot merge two different prompts."""
    _, row_of_N = torch.unique(torch.cat([prompt_N_T, prompt_mask_N_T.to(prompt_N_T.dtype)], dim=1), dim=0,
                               return_inverse=True)
    count = int(row_of_N.max()) + 1
    first_N_of_U = torch.full((count,), len(row_of_N), dtype=torch.long, device=row_of_N.device)
    first_N_of_U.scatter_reduce_(0, row_of_N, torch.arange(len(row_of_N), device=row_of_N.device), reduce="amin")
    return PromptGroups(row_of_N, first_N_of_U)


def positions(attention_mask_N_T: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask, so left padding does not shift them."""
    return (attention_mask_N_T.cumsum(dim=1) - 1).clamp(min=0)


def shared_prompt_cache(model: PreTrainedModel, input_ids_U_T: torch.Tensor, attention_mask_U_T: torch.Tensor,
                        row_of_N: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Runs the distinct prompts once; returns their KV cache copied to the N rows, and the [U, V]
    logits at each prompt's last position (they predict its first response token)."""
    cache_U, last_logits_U_V = prompt_cache(model, input_ids_U_T, attention_mask_U_T)
    return copied_cache(cache_U, row_of_N, model), last_logits_U_V


def prompt_cache(model: PreTrainedModel, input_ids_U_T: torch.Tensor,
                 attention_mask_U_T: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """The distinct prompts' KV cache, one row each, and the [U, V] logits at their last position."""
    cache = DynamicCache(config=model.config)
    output = model(input_ids=input_ids_U_T, attention_mask=attention_mask_U_T,
                   position_ids=positions(attention_mask_U_T), use_cache=True, logits_to_keep=1,
                   **{cache_argument(model): cache})
    return cache, output.logits[:, -1]


def copied_cache(cache_U: DynamicCache, row_of_n: torch.Tensor, model: PreTrainedModel) -> DynamicCache:
    """A new cache whose row i is cache_U's row row_of_n[i] (what DynamicCache.reorder_cache does,
    with a faster backward, and leaving cache_U as it was, for other rows to copy from)."""
    cache = DynamicCache(config=model.config)
    for layer, source in zip(cache.layers, cache_U.layers, strict=True):
        if source.is_initialized and source.get_seq_length() > 0:
            layer.lazy_initialization(source.keys, source.values)
            layer.keys, layer.values = copy_rows(source.keys, row_of_n), copy_rows(source.values, row_of_n)
    return cache


class _CopyRows(torch.autograd.Function):
    """index_select on the batch axis, whose backward sums the rows' gradients back per prompt.

    torch's own backward of index_select (what DynamicCache.reorder_cache calls) scatters the strided
    gradient it gets (the cache's keys are a slice of what attention saw) in place, which took 4.5 ms
    of the embedded default's 69 ms learner step on CPU; summing a contiguous copy takes a tenth of
    that, and the sums are the same, bit for bit (tests/test_prefix.py)."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, row_of_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(row_of_N)
        ctx.source_rows = source.shape[0]
        return source.index_select(0, row_of_N)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        (row_of_N,) = ctx.saved_tensors
        summed = gradient.new_zeros((ctx.source_rows, *gradient.shape[1:]))
        return summed.index_add_(0, row_of_N, gradient.contiguous()), None


def copy_rows(source_U: torch.Tensor, row_of_N: torch.Tensor) -> torch.Tensor:
    """source_U[row_of_N], differentiable: gradients of rows that copy the same source row add up."""
    return _CopyRows.apply(source_U, row_of_N)


# A narrower pass for the short responses pays when it skips at least this share of the batch's
# response positions: below it, a second pass's fixed cost (kernel launches, Python) eats the saving.
MIN_PADDING_SKIPPED = 0.15


def length_buckets(response_mask_N_L: torch.Tensor) -> list[tuple[torch.Tensor | None, int]]:
    """(rows, width) passes that cover every row's response (rows None: every row): one pass as wide
    as the longest response, or one for the rows whose responses fit in a narrower width and one
    for the rest.

    The narrow width is the one that skips the most padded positions; the split is made only when
    that is at least MIN_PADDING_SKIPPED of N x (the longest response). A batch of the embedded
    default is as wide as its longest response (up to 6 tokens) while most responses take 3: over
    a quarter of its positions are padding. A batch padded past its longest response (a micro-batch
    of short rows) gets one pass that wide.
    """
    count, width = response_mask_N_L.shape
    lengths_N = response_mask_N_L.sum(dim=1)
    longest = max(int(lengths_N.max()), 1) if count else width
    best_width, best_skipped = longest, 0
    for narrow in range(1, longest):
        skipped = int((lengths_N <= narrow).sum()) * (longest - narrow)
        if skipped > best_skipped:
            best_width, best_skipped = narrow, skipped
    if best_skipped < MIN_PADDING_SKIPPED * count * longest:
        return [(None, longest)]
    short_N = lengths_N <= best_width
    return [(short_N.nonzero().squeeze(1), best_width), ((~short_N).nonzero().squeeze(1), longest)]


def response_logit_parts(model: PreTrainedModel, tokens_N_T: torch.Tensor, attention_mask_N_T: torch.Tensor,
                         prompt_width: int, share_prompts: bool = True,
                         skip_padding: bool = False) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
    """(rows, [n, W, V] logits that predict those rows' first W response tokens): one pass of every
    row (rows None) over the whole width, or with `skip_padding` one per length bucket. The prompts
    run once for all buckets when their rows share them."""
    response_width = tokens_N_T.shape[1] - prompt_width
    groups = (prompt_groups(tokens_N_T[:, :prompt_width], attention_mask_N_T[:, :prompt_width])
              if share_prompts and can_share(model) else None)
    buckets = length_buckets(attention_mask_N_T[:, prompt_width:]) if skip_padding else [(None, response_width)]
    if groups is None or not groups.saves_work:
        for rows, width in buckets:
            tokens_n_T, mask_n_T = take_rows(tokens_N_T, rows), take_rows(attention_mask_N_T, rows)
            # Logits only where they are used: for a 128k vocabulary they are most of the activations.
            logits_n_K_V = model(input_ids=tokens_n_T[:, :prompt_width + width],
                                 attention_mask=mask_n_T[:, :prompt_width + width],
                                 position_ids=positions(mask_n_T[:, :prompt_width + width]),
                                 logits_to_keep=width + 1).logits
            yield rows, logits_n_K_V[:, :-1]
        return
    first_N = groups.first_N_of_U
    cache_U, first_logits_U_V = prompt_cache(model, tokens_N_T[first_N, :prompt_width],
                                             attention_mask_N_T[first_N, :prompt_width])
    for rows, width in buckets:
        row_of_n = take_rows(groups.row_of_N, rows)
        first_logits_n_1_V = first_logits_U_V[row_of_n, None]
        if width == 1:
            yield rows, first_logits_n_1_V
            continue
        # The last response token predicts nothing that is scored: it is not fed.
        tokens_n_T, mask_n_T = take_rows(tokens_N_T, rows), take_rows(attention_mask_N_T, rows)
        end = prompt_width + width - 1
        rest_logits_n_L_V = model(input_ids=tokens_n_T[:, prompt_width:end], attention_mask=mask_n_T[:, :end],
                                  position_ids=positions(mask_n_T)[:, prompt_width:end], use_cache=True,
                                  **{cache_argument(model): copied_cache(cache_U, row_of_n, model)}).logits
        yield rows, torch.cat([first_logits_n_1_V, rest_logits_n_L_V], dim=1)


def take_rows(tensor_N: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """tensor_N[rows]; rows None: every row."""
    return tensor_N if rows is None else tensor_N[rows]
