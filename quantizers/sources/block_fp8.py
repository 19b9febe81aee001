"""Block-FP8 sources (DeepSeek-V3/R1, Kimi-K2): float8_e4m3fn weights, one float32 scale per tile.

The checkpoint stores `weight` (out, in) as E4M3 and `weight_scale_inv` (ceil(out/bh),
ceil(in/bw)); despite its name the scale multiplies: weight = fp8 * scale_inv, tile by tile
(DeepSeek's `weight_dequant`). Edge tiles are partial, as in compressed-tensors' FP8_BLOCK.
"""

from __future__ import annotations

import math

import torch

from quantizers.errors import InvalidSourceError
from quantizers.formats._common import round_to_dtype
from quantizers.formats.fp8_bits import e4m3_table
from quantizers.kernels import maybe_compiled

__all__ = ["dequantize", "scale_shape"]


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The scale tensor's shape for a weight of `shape` in tiles of `block`."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    *,
    name: str = "weight",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """fp8 (out, in) and its tile scales -> the weight they mean, computed in float32 and rounded
    to `dtype` last (in the same kernel, so no float32 copy of the weight is made)."""
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise InvalidSourceError(
            f"{name}: a block-FP8 weight is 2-D float8_e4m3fn, got "
            f"{str(weight.dtype).removeprefix('torch.')} of shape {list(weight.shape)}"
        )
    rows, columns = weight.shape
    expected = scale_shape((rows, columns), block)
    if tuple(scale_inv.shape) != expected:
        raise InvalidSourceError(
            f"{name}: weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(expected)} "
            f"(one scale per {block[0]}x{block[1]} tile of a {rows}x{columns} weight)"
        )
    bh, bw = block
    codes = weight.view(torch.uint8)
    pad_rows, pad_cols = expected[0] * bh - rows, expected[1] * bw - columns
    if pad_rows or pad_cols:
        codes = torch.nn.functional.pad(codes, (0, pad_cols, 0, pad_rows))
    tiles = codes.view(expected[0], bh, expected[1], bw)
    # One fused kernel for large weights: torch's own fp8 -> float32 conversion is a scalar loop on
    # CPUs without native FP8 and would dominate the conversion. Each code is looked up in a
    # 256-entry table (exact E4M3 values), multiplied by its tile's scale, broadcast in place (no
    # expanded scale tensor), and rounded to bf16 on the bits: twice as fast as decoding the bits
    # and converting with `.to(bfloat16)`, which Inductor does slowly on AVX2 (measured in
    # docs/benchmarks.md), and bit-identical to both.
    chosen = _dequant_bf16 if dtype == torch.bfloat16 else _dequant_kernel
    kernel = maybe_compiled(chosen, weight.numel(), None)
    scale = scale_inv.float().view(expected[0], 1, expected[1], 1)
    out = kernel(tiles, scale, e4m3_table(weight.device), dtype)
    out = out.view(expected[0] * bh, expected[1] * bw)
    return out[:rows, :columns] if pad_rows or pad_cols else out


def _dequant_kernel(tiles: torch.Tensor, scale: torch.Tensor, table: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    return round_to_dtype(table[tiles.to(torch.int32)] * scale, dtype).to(dtype)


def _dequant_bf16(tiles: torch.Tensor, scale: torch.Tensor, table: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    bits = (table[tiles.to(torch.int32)] * scale).view(torch.int32)
    # Round to nearest even on the bits (as `round_to_dtype`), then keep the upper half as bf16.
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).to(torch.int16).view(torch.bfloat16)
