"""Hugging Face checkpoint -> GGUF: architecture, tensor names and hyper-parameter metadata.

Names and keys come from the `gguf` package (`get_tensor_name_map`, `Keys`, `MODEL_ARCH`), so
they follow llama.cpp's own tables. Families differ only by declared data below: which GGUF
architecture a `config.json` architecture becomes, and whether llama.cpp permutes its Q/K rows
(`convert_hf_to_gguf.py`'s `LlamaModel.permute`: llama.cpp's RoPE pairs dimension i with
i + head_dim/2, Hugging Face's Llama with i + 1). MoE experts, one 2-D tensor per expert in the
checkpoint, become one 3-D `ffn_*_exps` tensor per layer; each expert is a slice of it. A source
with transformers 5's fused 3-D experts (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) reaches this map already split into those per-expert names (`flows.sources`), each a
byte range of the fused tensor. The expert count is `num_experts` in older configs and
`num_local_experts` in the ones transformers 5 writes; both are read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gguf

from infra.errors import CheckpointError
from infra.gguf.header import MetadataValue

__all__ = ["GGUFFamily", "FAMILIES", "family_for", "TensorTarget", "map_tensor", "hyper_parameters",
           "UnsupportedArchitectureError", "expert_count", "check_config"]

V = gguf.GGUFValueType


class UnsupportedArchitectureError(CheckpointError):
    """config.json names an architecture quantfleet cannot write as GGUF."""


@dataclass(frozen=True, slots=True)
class GGUFFamily:
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's LLM_ARCH_LLAMA rope layout


FAMILIES: dict[str, GGUFFamily] = {
    "LlamaForCausalLM": GGUFFamily(gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": GGUFFamily(gguf.MODEL_ARCH.LLAMA, True),  # llama.cpp converts it as llama
    "Qwen2ForCausalLM": GGUFFamily(gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": GGUFFamily(gguf.MODEL_ARCH.QWEN3, False),
    "Qwen3MoeForCausalLM": GGUFFamily(gguf.MODEL_ARCH.QWEN3MOE, False),
}

# config.json keys the GGUF header is written from (`hyper_parameters`, `map_tensor`): those every
# model needs, those a MoE adds, and those that may be absent. Checked at planning, so a config
# without one fails in one line before converting, not in a worker writing the first split.
_REQUIRED_INTS = ("hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads",
                  "num_hidden_layers", "vocab_size")
_REQUIRED_NUMBERS = ("rms_norm_eps",)
_MOE_REQUIRED_INTS = ("num_experts_per_tok", "moe_intermediate_size")
_OPTIONAL_INTS = ("head_dim", "num_key_value_heads", "num_experts", "num_local_experts",
                  "decoder_sparse_step")
_OPTIONAL_NUMBERS = ("rope_theta",)
_OPTIONAL_OBJECTS = ("rope_scaling", "rope_parameters")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def check_config(config: dict[str, Any], source: str = "config.json") -> None:
    """Refuse a config that lacks a key the GGUF header needs, or holds one of the wrong type."""
    def wrong(key: str, described: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key!r} must be {described} for GGUF output, not {config[key]!r}")

    for key in _OPTIONAL_INTS:
        if config.get(key) is not None and not _is_int(config[key]):
            raise wrong(key, "an integer")
    for key in _OPTIONAL_NUMBERS:
        if config.get(key) is not None and not _is_number(config[key]):
            raise wrong(key, "a number")
    for key in _OPTIONAL_OBJECTS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise wrong(key, "an object")
    ints = _REQUIRED_INTS + (_MOE_REQUIRED_INTS if expert_count(config) else ())
    missing = [key for key in (*ints, *_REQUIRED_NUMBERS) if config.get(key) is None]
    if missing:
        raise CheckpointError(f"{source}: lacks {', '.join(map(repr, missing))}, which GGUF output needs")
    for key in ints:
        if not _is_int(config[key]):
            raise wrong(key, "an integer")
    for key in _REQUIRED_NUMBERS:
        if not _is_number(config[key]):
            raise wrong(key, "a number")


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def expert_count(config: dict[str, Any]) -> int:
    """Routed experts per MoE layer (0: a dense model), under either of transformers' key names."""
    return int(config.get("num_experts") or config.get("num_local_experts") or 0)


def _check_qwen3_moe(config: dict[str, Any], name: str, source: str) -> None:
    """What llama.cpp's qwen3moe graph assumes and a config can say otherwise: it always renormalises
    the chosen experts' weights (no key turns that off; a model that does not -- transformers'
    default when the key is absent -- would load and run but compute something else), and it
    expects experts in every layer (a dense layer's MLP has no tensor for it to load)."""
    if not config.get("norm_topk_prob", False):
        raise UnsupportedArchitectureError(
            f"{source}: {name} with norm_topk_prob false cannot be written as GGUF; llama.cpp's "
            "qwen3moe always normalises the top-k expert weights"
        )
    dense, step = config.get("mlp_only_layers") or [], config.get("decoder_sparse_step") or 1
    if not isinstance(dense, list) or not _is_int(step):
        raise CheckpointError(f"{source}: 'mlp_only_layers' must be a list and 'decoder_sparse_step' an "
                              f"integer, not {dense!r} and {step!r}")
    if dense or step != 1:
        raise UnsupportedArchitectureError(
            f"{source}: {name} with dense layers (mlp_only_layers {dense}, decoder_sparse_step {step}) "
            "cannot be written as GGUF; llama.cpp's qwen3moe expects experts in every layer"
        )


def family_for(config: dict[str, Any], source: str = "config.json") -> GGUFFamily:
    """The family of a checkpoint's config; anything else is refused naming what is supported."""
    names = config.get("architectures") or ["(none)"]
    for name in names:
        if name in FAMILIES:
            family = FAMILIES[name]
            if family.arch == gguf.MODEL_ARCH.QWEN3MOE:
                _check_qwen3_moe(config, name, source)
            return family
    raise UnsupportedArchitectureError(
        f"{source}: architecture {', '.join(names)} cannot be written as GGUF; "
        f"supported: {', '.join(FAMILIES)}"
    )


@dataclass(frozen=True, slots=True)
class TensorTarget:
    """Where a source tensor goes: GGUF name, expert slice (index, count) or None, and the head
    count its rows are permuted with (None: not permuted)."""

    name: str
    expert: tuple[int, int] | None = None
    permute_heads: int | None = None


def map_tensor(name: str, config: dict[str, Any], family: GGUFFamily) -> TensorTarget | None:
    """The GGUF target of a Hugging Face tensor, or None for one llama.cpp does not load
    (e.g. rotary inverse frequencies)."""
    layers = int(config["num_hidden_layers"])
    expert = _EXPERT.match(name)
    if expert:
        layer, index, kind = expert.groups()
        return TensorTarget(f"blk.{layer}.ffn_{kind}_exps.weight", (int(index), expert_count(config)))
    mapped = gguf.get_tensor_name_map(family.arch, layers).get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        return None
    heads = None
    if family.permute_qk and name.endswith("self_attn.q_proj.weight"):
        heads = int(config["num_attention_heads"])
    elif family.permute_qk and name.endswith("self_attn.k_proj.weight"):
        heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return TensorTarget(mapped, permute_heads=heads)  # the map keeps the suffix


def hyper_parameters(config: dict[str, Any], family: GGUFFamily, name: str) -> dict[str, MetadataValue]:
    """`general.*` and `{arch}.*` keys from config.json (what convert_hf_to_gguf writes for these
    families, RoPE included)."""
    arch = gguf.MODEL_ARCH_NAMES[family.arch]
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)

    def key(template: str) -> str:
        return template.format(arch=arch)

    values: dict[str, MetadataValue] = {
        gguf.Keys.General.ARCHITECTURE: MetadataValue(V.STRING, arch),
        gguf.Keys.General.NAME: MetadataValue(V.STRING, name),
        key(gguf.Keys.LLM.CONTEXT_LENGTH): MetadataValue(V.UINT32, int(config["max_position_embeddings"])),
        key(gguf.Keys.LLM.EMBEDDING_LENGTH): MetadataValue(V.UINT32, int(config["hidden_size"])),
        key(gguf.Keys.LLM.BLOCK_COUNT): MetadataValue(V.UINT32, int(config["num_hidden_layers"])),
        key(gguf.Keys.LLM.FEED_FORWARD_LENGTH): MetadataValue(V.UINT32, int(config["intermediate_size"])),
        key(gguf.Keys.Attention.HEAD_COUNT): MetadataValue(V.UINT32, heads),
        key(gguf.Keys.Attention.HEAD_COUNT_KV):
            MetadataValue(V.UINT32, int(config.get("num_key_value_heads") or heads)),
        key(gguf.Keys.Attention.LAYERNORM_RMS_EPS): MetadataValue(V.FLOAT32, float(config["rms_norm_eps"])),
        key(gguf.Keys.Attention.KEY_LENGTH): MetadataValue(V.UINT32, head_dim),
        key(gguf.Keys.Attention.VALUE_LENGTH): MetadataValue(V.UINT32, head_dim),
        key(gguf.Keys.Rope.DIMENSION_COUNT): MetadataValue(V.UINT32, head_dim),
        key(gguf.Keys.LLM.VOCAB_SIZE): MetadataValue(V.UINT32, int(config["vocab_size"])),
    }
    rope = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        values[key(gguf.Keys.Rope.FREQ_BASE)] = MetadataValue(V.FLOAT32, float(theta))
    scaling = config.get("rope_scaling") or rope
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("linear", "yarn") and scaling.get("factor"):
        values[key(gguf.Keys.Rope.SCALING_TYPE)] = MetadataValue(V.STRING, kind)
        values[key(gguf.Keys.Rope.SCALING_FACTOR)] = MetadataValue(V.FLOAT32, float(scaling["factor"]))
    experts = expert_count(config)
    if experts:
        values[key(gguf.Keys.LLM.EXPERT_COUNT)] = MetadataValue(V.UINT32, experts)
        values[key(gguf.Keys.LLM.EXPERT_USED_COUNT)] = MetadataValue(
            V.UINT32, int(config["num_experts_per_tok"]))
        values[key(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)] = MetadataValue(
            V.UINT32, int(config["moe_intermediate_size"]))
    return values
