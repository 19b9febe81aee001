"""GGUF tensor types: quantize a weight into the bytes llama.cpp stores, and read them back.

    from quantizers.gguf import gguf_type, quantize_gguf, dequantize_gguf
    packed = quantize_gguf(weight, "Q4_K")     # (rows, cols / 256 * 144) uint8, llama.cpp's bytes
    restored = dequantize_gguf(packed, "Q4_K", weight.shape)

A weight is a 2-D (rows, cols) tensor in Hugging Face order; GGUF calls cols ne[0] and stores
each row as cols / block_size blocks. Higher-rank tensors (merged MoE experts) are flattened to
rows first. Our own torch code quantizes F32/F16/BF16, Q8_0 and the k-quants Q4_K, Q5_K, Q6_K
(byte-identical to llama.cpp's reference quantizers, no importance matrix); Q5_0 and Q5_1, which
llama.cpp substitutes for k-quants on rows that are not a multiple of 256, go through the `gguf`
package. Reading back always goes through the `gguf` package's dequantizers: an independent
implementation, so verifying a tensor also checks our packing against the format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from quantizers.errors import InvalidWeightError, UnknownSchemeError
from quantizers.gguf.floats import to_float_bytes
from quantizers.gguf.k_quants import quantize_q4_k, quantize_q5_k, quantize_q6_k
from quantizers.gguf.legacy import quantize_q8_0, quantize_with_gguf

# Each block search adds its sums row by row (llama.cpp's order), one small torch op per row: chunks
# of 512K weights keep those ops long enough that Python's per-op cost does not dominate (1.5x
# faster than 128K chunks for Q4_K on one CPU thread) while a chunk's temporaries stay ~100 MB.
_CHUNK_WEIGHTS = 1 << 19

__all__ = ["GGUFType", "GGUF_TYPES", "gguf_type", "quantize_gguf", "dequantize_gguf", "row_bytes"]


@dataclass(frozen=True, slots=True)
class GGUFType:
    """A GGML tensor type: `block_size` weights stored in `type_size` bytes."""

    name: str
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    @property
    def is_quantized(self) -> bool:
        return self.name not in ("F32", "F16", "BF16")


def _table() -> dict[str, GGUFType]:
    import gguf

    names = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_0", "Q5_1")
    return {
        name: GGUFType(name, *gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]) for name in names
    }


GGUF_TYPES: dict[str, GGUFType] = _table()

_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": quantize_q8_0,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}


def gguf_type(name: str) -> GGUFType:
    """The type called `name` (case-insensitive); an unknown name's error lists the valid ones."""
    key = name.strip().upper()
    if key not in GGUF_TYPES:
        raise UnknownSchemeError(f"unknown GGUF type {name!r}; valid types: {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[key]


def row_bytes(type_name: str, columns: int) -> int:
    """Bytes one row of `columns` weights takes in `type_name`."""
    kind = GGUF_TYPES[type_name]
    return columns // kind.block_size * kind.type_size


def quantize_gguf(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """Weight (rows, cols) -> its GGUF bytes (rows, row_bytes) uint8, on the weight's device."""
    kind = gguf_type(type_name)
    if weight.dim() != 2:
        raise InvalidWeightError(f"GGUF quantizers take 2-D weights (got shape {list(weight.shape)})")
    if weight.shape[1] % kind.block_size:
        raise InvalidWeightError(
            f"{kind.name} needs rows that are a multiple of {kind.block_size} weights "
            f"(got {weight.shape[1]})"
        )
    with torch.no_grad():
        if not kind.is_quantized:
            return to_float_bytes(weight, kind.name)
        quantizer = _QUANTIZERS.get(kind.name)
        if quantizer is None:
            return quantize_with_gguf(weight, kind.name)
        rows_per_chunk = max(1, _CHUNK_WEIGHTS // weight.shape[1])
        if weight.shape[0] <= rows_per_chunk:
            return quantizer(weight)
        # The block searches make ~20 passes over their input: bounded chunks keep those passes
        # (and their temporaries) small instead of sweeping whole tensors through memory.
        return torch.cat([quantizer(chunk) for chunk in weight.split(rows_per_chunk)])


def dequantize_gguf(packed: torch.Tensor, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF bytes (rows, row_bytes) -> float32 weight `shape`, through the `gguf` package."""
    import gguf

    kind = gguf_type(type_name)
    data = packed.detach().cpu().contiguous().numpy()
    if kind.name == "F32":
        values = data.view(np.float32)
    elif kind.name == "F16":
        values = data.view(np.float16).astype(np.float32)
    else:
        values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind.name])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
