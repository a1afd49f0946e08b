"""A small Hugging Face checkpoint built here: a tiny Llama and a byte-level BPE tokenizer trained
with `tokenizers` on the project's own text (the GSM8K-format sample, which the project generates;
not the README, so that editing docs does not change the tokenizer the tests build)."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stalerl.random_checkpoint import build_bpe_tokenizer as build_tokenizer_on

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "gsm8k_sample.jsonl"


def build_bpe_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    return build_tokenizer_on(SAMPLE.read_text().splitlines(), vocab_size)


def save_tiny_checkpoint(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    tokenizer = build_bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
