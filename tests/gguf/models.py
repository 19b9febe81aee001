"""Small transformers-built source checkpoints for the GGUF tests, with a real tokenizer.

llama.cpp cannot load a model without a vocabulary, and the tiny test models of tests/flows have
none; so a byte-level BPE tokenizer (GPT-2 style, llama.cpp's `gpt2` model with the `gpt-2`
pre-tokenizer) is trained here with the `tokenizers` library on the evaluation text that ships
with quantfleet, to exactly the model's vocabulary size, and saved beside the weights with a
ChatML chat template. Deterministic: the same files every time.

`qwen3moe` is a Qwen3-MoE with 8 experts (8 is the count llama.cpp's Q4_K_M rule singles out);
transformers 5 saves its experts per expert (`mlp.experts.{e}.gate_proj.weight`), and
`fuse_experts` rewrites such a checkpoint in the fused 3-D layout transformers 5 holds them in
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]), which it also loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["save_gguf_source", "fuse_experts", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

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
    """A small `llama`, `qwen2`, `qwen3` or `qwen3moe` checkpoint (vocab 1024) with its tokenizer,
    in `path`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
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
    elif kind == "qwen3moe":
        # norm_topk_prob as every released Qwen3-MoE has it (llama.cpp's qwen3moe always normalises).
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **common, head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]))
    else:
        raise ValueError(kind)
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    save_tokenizer(path, 1024)
    json.loads((path / "tokenizer.json").read_text())  # written whole
    return path


def fuse_experts(path: Path) -> Path:
    """Rewrite the per-expert checkpoint in `path` with fused 3-D experts, as one model.safetensors."""
    from safetensors.torch import load_file, save_file

    files = sorted(path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
        file.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    experts = int(json.loads((path / "config.json").read_text())["num_local_experts"])
    layers = sorted({int(name.split(".")[2]) for name in tensors if ".mlp.experts." in name})
    for layer in layers:
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up, down = [], []
        for e in range(experts):
            gate = tensors.pop(f"{prefix}.{e}.gate_proj.weight")
            up = tensors.pop(f"{prefix}.{e}.up_proj.weight")
            gate_up.append(torch.cat([gate, up]))
            down.append(tensors.pop(f"{prefix}.{e}.down_proj.weight"))
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up).contiguous()
        tensors[f"{prefix}.down_proj"] = torch.stack(down).contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path
