"""The embedded default model: a character tokenizer and a tiny Llama from transformers' own classes.

Both are ordinary Hugging Face objects: ``save_pretrained`` writes a checkpoint (safetensors plus
tokenizer files) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from stalerl.config import ModelConfig

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' per-shard bars off while a model loads or saves (noise in a sweep's or a bench's
    log), then as they were: a caller that had turned them off keeps them off."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character; ``<bos>`` prepended; left padding for batched generation."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(set(alphabet)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    backend.decoder = decoders.Fuse()  # decode to "42", not "4 2"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_tiny_llama(config: ModelConfig, vocab_size: int, seed: int) -> LlamaForCausalLM:
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config)


def load_checkpoint(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Loads a local Hugging Face checkpoint directory; never executes code from it."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
