"""A group's prompt, computed once: GRPO's G samples of a prompt share it, so its forward pass
(keys and values) is run on the distinct prompts only and the KV cache is copied to every sample.

Both sides use it: generation prefills the distinct prompts before ``generate`` (the prompt half of
rollout time), and the learner's log-probs run the prompt block once per group, then the responses
on the copied cache; gradients flow back through the copy into the shared prompt pass. The result
equals the whole-sequence forward up to float rounding (tests/test_prefix.py checks log-probs and
gradients). vLLM does the same for its side with its prefix cache.
"""

from __future__ import annotations

import inspect
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
    cache = DynamicCache(config=model.config)
    output = model(input_ids=input_ids_U_T, attention_mask=attention_mask_U_T,
                   position_ids=positions(attention_mask_U_T), use_cache=True, logits_to_keep=1,
                   **{cache_argument(model): cache})
    for layer in cache.layers:  # what DynamicCache.reorder_cache does, with a faster backward
        if layer.is_initialized and layer.get_seq_length() > 0:
            layer.keys, layer.values = copy_rows(layer.keys, row_of_N), copy_rows(layer.values, row_of_N)
    return cache, output.logits[:, -1]


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


def response_logits(model: PreTrainedModel, tokens_N_T: torch.Tensor, attention_mask_N_T: torch.Tensor,
                    prompt_width: int, share_prompts: bool = True) -> torch.Tensor:
    """[N, L, V] logits that predict the L response tokens (positions T_p - 1 .. T - 2)."""
    response_width = tokens_N_T.shape[1] - prompt_width
    groups = (prompt_groups(tokens_N_T[:, :prompt_width], attention_mask_N_T[:, :prompt_width])
              if share_prompts and can_share(model) else None)
    if groups is None or not groups.saves_work:
        # Logits only where they are used: for a 128k vocabulary they are most of the activations.
        logits_N_K_V = model(input_ids=tokens_N_T, attention_mask=attention_mask_N_T,
                             position_ids=positions(attention_mask_N_T), logits_to_keep=response_width + 1).logits
        return logits_N_K_V[:, :-1]
    first_N = groups.first_N_of_U
    cache, first_logits_U_V = shared_prompt_cache(model, tokens_N_T[first_N, :prompt_width],
                                                  attention_mask_N_T[first_N, :prompt_width], groups.row_of_N)
    first_logits_N_1_V = first_logits_U_V[groups.row_of_N, None]
    if response_width == 1:
        return first_logits_N_1_V
    # The last response token predicts nothing that is scored: it is not fed.
    rest_logits_N_L_V = model(input_ids=tokens_N_T[:, prompt_width:-1], attention_mask=attention_mask_N_T[:, :-1],
                              position_ids=positions(attention_mask_N_T)[:, prompt_width:-1], use_cache=True,
                              **{cache_argument(model): cache}).logits
    return torch.cat([first_logits_N_1_V, rest_logits_N_L_V], dim=1)
