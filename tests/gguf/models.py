"""Small transformers-built source checkpoints for the GGUF tests, with a real tokenizer.

llama.cpp cannot load a model without a vocabulary, and the tiny test models of tests/flows have
none; so a byte-level BPE tokenizer (GPT-2 style, llama.cpp's `gpt2` model with the `gpt-2`
pre-tokenizer) is trained here with the `tokenizers` library on the evaluation text that ships
with quantfleet, to exactly the model's vocabulary size, and saved beside the weights with a
ChatML chat template. Deterministic: the same files every time.

`mistral` and `llama2` get a SentencePiece-style tokenizer instead, shaped like Llama 2's and
Mistral's tokenizer.json: `<unk>`, `<s>`, `</s>`, the 256 byte pieces `<0x00>`..`<0xFF>` at ids
3-258, then BPE pieces with `▁` for spaces (trained here with `tokenizers`' BPE trainer on a
Metaspace pre-tokenizer), byte fallback, BOS added, and a Mistral-style `[INST]` chat template.
`mistral`'s puts the `▁` in with a Metaspace pre-tokenizer (what transformers' converter writes
today), `llama2`'s with the `Prepend("▁")` + `Replace(" ", "▁")` normalizer Llama 2 shipped.

`qwen3moe` is a Qwen3-MoE with 8 experts (8 is the count llama.cpp's Q4_K_M rule singles out);
transformers 5 saves its experts per expert (`mlp.experts.{e}.gate_proj.weight`), and
`fuse_experts` rewrites such a checkpoint in the fused 3-D layout transformers 5 holds them in
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]), which it also loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["save_gguf_source", "fuse_experts", "save_sentencepiece_tokenizer", "CHAT_TEMPLATE",
           "SPECIAL_TOKENS", "MISTRAL_CHAT_TEMPLATE"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
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


def save_sentencepiece_tokenizer(path: Path, vocab_size: int, *, legacy: bool = False) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False,
                                  limit_alphabet=200)
    text = _training_text()
    tokenizer.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer)
    data = json.loads(tokenizer.to_str())
    trained = data["model"]["vocab"]
    vocab = {piece: i for piece, i in trained.items() if i < len(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    vocab.update({piece: i + 256 for piece, i in trained.items() if i >= len(specials)})
    data["model"]["vocab"] = vocab
    # As Llama 2's and Mistral's tokenizer.json: the whole text one piece sequence, BOS in front.
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                             "split": False}
    if legacy:
        data["pre_tokenizer"] = None
        data["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    bos = [{"SpecialToken": {"id": "<s>", "type_id": 0}}]
    data["post_processor"] = {
        "type": "TemplateProcessing", "single": [*bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [*bos, {"Sequence": {"id": "A", "type_id": 0}},
                 *bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = MISTRAL_CHAT_TEMPLATE
    fast.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def save_gguf_source(kind: str, path: Path, *, layers: int = 2, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16, shard: str = "2MB") -> Path:
    """A small `llama`, `llama2`, `mistral`, `qwen2`, `qwen3` or `qwen3moe` checkpoint (vocab 1024)
    with its tokenizer, in `path`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
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
    elif kind == "llama2":
        model = LlamaForCausalLM(LlamaConfig(**{**common, "bos_token_id": 1}))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**common, "bos_token_id": 1}, sliding_window=None))
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
    if kind in ("mistral", "llama2"):
        save_sentencepiece_tokenizer(path, 1024, legacy=kind == "llama2")
    else:
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


def unsupported_copy(source: Path, dest: Path, architecture: str = "FalconForCausalLM") -> Path:
    """A copy of `source` whose config names an architecture GGUF output does not support."""
    import shutil

    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config["architectures"] = [architecture]
    (dest / "config.json").write_text(json.dumps(config))
    return dest
