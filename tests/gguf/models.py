"""Small transformers-built source checkpoints for the GGUF tests, with a real tokenizer.

llama.cpp cannot load a model without a vocabulary, and the tiny test models of tests/flows have
none; so a byte-level BPE tokenizer (GPT-2 style, llama.cpp's `gpt2` model with the `gpt-2`
pre-tokenizer) is trained here with the `tokenizers` library on the evaluation text that ships
with quantfleet, to exactly the model's vocabulary size, and saved beside the weights with a
ChatML chat template. Deterministic: the same files every time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["save_gguf_source", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _training_text() -> str:
    from importlib.resources import files

    return (files("workers.evaluation") / "data" / "python-reference.txt").read_text()


def save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = _training_text()
    tokenizer.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def save_gguf_source(kind: str, path: Path, *, layers: int = 2, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16, shard: str = "2MB") -> Path:
    """A small `llama`, `qwen2` or `qwen3` checkpoint (vocab 1024) with its tokenizer, in `path`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=2)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=64))
    else:
        raise ValueError(kind)
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    save_tokenizer(path, 1024)
    json.loads((path / "tokenizer.json").read_text())  # written whole
    return path
