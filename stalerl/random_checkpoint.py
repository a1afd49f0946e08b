"""A checkpoint of a named Llama shape with random weights, for timing where no hub can be reached.

    stalerl bench --out DIR --model random:llama-3.2-1b --data data/gsm8k_sample.jsonl

Speed depends on the architecture, not on the weights: a Llama-3.2-1B-shaped model (16 layers,
hidden 2048, grouped-query attention with 8 key/value heads, 128,256-token vocabulary, tied
embeddings) costs what the released one costs per token. Its tokenizer is a byte-level BPE trained
here on the given text, smaller than Llama 3's; ids past its vocabulary decode to nothing, and a
random policy rarely samples end-of-sequence, so every response runs to max_new_tokens (a
fixed-length workload). Rewards are near zero, so these runs time the system, not learning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stalerl.model import quiet_progress_bars

PREFIX = "random:"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
# A minimal chat template: the tokenizer adds <bos> itself too, so the task must not double it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# LlamaConfig fields per shape; "llama-3.2-1b" is meta-llama/Llama-3.2-1B's config.json (rope
# scaling left out: it changes no cost). "tiny" is for tests on CPU.
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 1024, "max_position_embeddings": 512,
             "tie_word_embeddings": True},
}


def build_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with <bos> prepended, left padding and CHAT_TEMPLATE, trained on `texts`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def shape_of(spec: str) -> str | None:
    """'random:SHAPE' -> SHAPE; anything else (a checkpoint directory) -> None."""
    if not spec.startswith(PREFIX):
        return None
    shape = spec.removeprefix(PREFIX)
    if shape not in SHAPES:
        raise ValueError(f"unknown random shape {shape!r} (known: {', '.join(SHAPES)})")
    return shape


def save_random_checkpoint(shape: str, path: Path, text_file: Path, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes a Hugging Face checkpoint (safetensors + tokenizer) of `shape` with random weights to `path`."""
    fields = SHAPES[shape]
    tokenizer = build_bpe_tokenizer(text_file.read_text().splitlines(), vocab_size=min(4096, fields["vocab_size"]))
    config = LlamaConfig(**fields, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    # Initialised where the timed runs will put it: 1B random draws on the GPU when there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[0] if device == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    with quiet_progress_bars():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
