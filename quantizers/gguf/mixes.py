"""llama.cpp's type mixes Q4_K_M and Q5_K_M: which tensor gets which GGUF type.

The rule, from `llama_tensor_get_type_impl` in llama.cpp's src/llama-quant.cpp (no importance
matrix, no manual overrides), for the dense and MoE families quantfleet writes:

- 1-D tensors and norms stay F32 (llama.cpp quantizes only 2-D+ weights, never `*_norm`).
- `output.weight` (and `token_embd.weight` when the model ties it to the output and has no
  `output.weight`): Q6_K, or Q8_0 when its rows are not a multiple of 256.
- `attn_v` of layer i (and fused `attn_qkv`): Q6_K when `use_more_bits(i, n)`, else the base type
  (Q4_K_M: Q4_K, Q5_K_M: Q5_K); `attn_qkv` is Q5_K (Q4_K_M) / Q6_K (Q5_K_M) always. A model with
  exactly 8 experts gets Q8_0 for attn_v and attn_k and Q5_K for attn_output (Q4_K_M).
- `ffn_down` (dense or `ffn_down_exps`) of layer i: Q6_K when `use_more_bits(i, n)`, else base.
- The MoE router (`ffn_gate_inp`) stays F32 under every scheme, mixes and plain types alike:
  convert_hf_to_gguf writes it F32 and llama-quantize never quantizes it.
- Everything else (token_embd, attn_q, attn_k, attn_output, ffn_gate, ffn_up, experts' gate/up):
  the base type. MoE experts are one 3-D tensor per layer (`ffn_down_exps`), so the ffn_down rule
  takes its layer from the name, as llama.cpp's `layer_info` does for models with experts.
- use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division).
- Finally a type whose block does not divide the row falls back: Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, and F16 if even that does not divide it.

Not reproduced: llama.cpp's extra Q5_K for the 70B Llama's attn_v (decided from the parameter
count of a model it recognises by size) and Falcon-specific rules (Falcon is not written).
"""

from __future__ import annotations

import re

from quantizers.gguf import GGUF_TYPES

__all__ = ["MIXES", "GGUF_SCHEMES", "mix_type", "use_more_bits", "fallback_type"]

MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}
# What `--format gguf` accepts as a scheme: a type for every 2-D weight, or a mix.
GGUF_SCHEMES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_K_M", "Q5_K_M")
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def fallback_type(type_name: str, columns: int) -> str:
    """The type llama.cpp actually uses for rows of `columns` weights."""
    if columns % GGUF_TYPES[type_name].block_size == 0:
        return type_name
    substitute = _FALLBACK.get(type_name, type_name)
    return substitute if columns % GGUF_TYPES[substitute].block_size == 0 else "F16"


def mix_type(
    scheme: str, name: str, columns: int, *, layers: int, experts: int = 0, tied_output: bool = False
) -> str:
    """GGUF type of tensor `name` (GGUF naming, rows of `columns`) under a type or a mix.

    `scheme` is a mix (Q4_K_M, Q5_K_M) or a plain type (then every 2-D weight gets it, after the
    same fallback). Norms and 1-D tensors are the caller's business: they stay F32.
    """
    if ".ffn_gate_inp." in name:
        return "F32"
    base = MIXES.get(scheme, scheme)
    wanted = base
    if scheme in MIXES:
        match = _LAYER.match(name)
        layer = int(match.group(1)) if match else -1
        if name == "output.weight" or (tied_output and name == "token_embd.weight"):
            wanted = "Q8_0" if columns % 256 else "Q6_K"
        elif ".attn_qkv." in name:
            wanted = "Q5_K" if scheme == "Q4_K_M" else "Q6_K"
        elif ".attn_v." in name:
            wanted = "Q8_0" if experts == 8 else "Q6_K" if use_more_bits(layer, layers) else base
        elif ".attn_k." in name and experts == 8:
            wanted = "Q8_0"
        elif ".attn_output." in name and experts == 8 and scheme == "Q4_K_M":
            wanted = "Q5_K"
        elif ".ffn_down" in name and use_more_bits(layer, layers):
            wanted = "Q6_K"
    return fallback_type(wanted, columns)
