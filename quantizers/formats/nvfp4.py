"""nvfp4-pack-quantized: E2M1 values in blocks of 16, FP8 block scales, one fp32 global scale.

Stored per Linear: weight_packed uint8 (out, in/2), weight_scale float8_e4m3fn (out, in/16),
weight_global_scale float32 (1,). The global scale is a multiplier, 448*6/amax(tensor), chosen so
block scales use FP8's whole range; value = fp4 * scale / global.

Fused partners (q/k/v, gate/up) must share one global scale for vLLM: pass `global_absmax`
(the largest absmax of the partners) and every partner gets the same global scale.
"""

from __future__ import annotations

import torch

from quantizers.formats._common import (
    CodesResult,
    FormatResult,
    eps_of,
    error_partials,
    exact_quotient,
    group_view,
    round_to_dtype,
    signed_absmax,
)
from quantizers.formats.fp8_bits import to_e4m3
from quantizers.kernels import compiles, maybe_compiled
from quantizers.methods import Grid, refine_scale
from quantizers.packing import fp4_codes, fp4_values, pack_nibbles, unpack_nibbles
from quantizers.scheme import QuantScheme

__all__ = [
    "quantize", "dequantize", "global_scale_for", "nibble_values", "nvfp4_grid", "FP4_MAX", "FP8_MAX",
]

FP4_MAX = 6.0
FP8_MAX = 448.0


def global_scale_for(absmax: torch.Tensor) -> torch.Tensor:
    """fp32 (1,) global scale for a tensor whose largest magnitude is `absmax` (weight dtype).

    As compressed-tensors' `generate_gparam`: computed in the weight's dtype, NaN/Inf -> 1.
    """
    dtype = absmax.dtype
    safe = absmax.clamp(min=torch.finfo(dtype).tiny)
    scale = ((FP8_MAX * FP4_MAX) / safe.float()).to(dtype)
    scale = torch.nan_to_num(scale.float(), nan=1.0, posinf=1.0, neginf=1.0)
    return scale.reshape(1)


def _nvfp4_scales(
    grouped: torch.Tensor, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grouped (rows, groups, 16) -> block scale (float32), its E4M3 code (uint8), absmax."""
    dtype = grouped.dtype
    absmax = signed_absmax(grouped, -1)
    local = round_to_dtype(exact_quotient(absmax.float(), FP4_MAX), dtype)
    scale = (global_scale * local).clamp(-FP8_MAX, FP8_MAX)
    codes, scale = to_e4m3(scale)  # round to FP8 (the stored dtype) on the bits
    eps = eps_of(torch.float8_e4m3fn)
    zero = scale == 0
    # 0.125 is E4M3 code 0x20.
    return torch.where(zero, eps, scale), torch.where(zero, 0x20, codes.int()).to(torch.uint8), absmax


def _nvfp4_codes(
    grouped: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, keep_values: bool
) -> CodesResult:
    """Nibbles (rows, cols) of every element, the error partial sums per block and, with
    `keep_values`, the dequantized weight (rows, cols) (what `dequantize` returns)."""
    effective = scale / global_scale
    x = grouped.float()
    codes, values = fp4_codes((x / effective).clamp(-FP4_MAX, FP4_MAX))
    # What compressed-tensors decompresses to: E2M1 value * (scale / global), in bf16.
    dequantized = round_to_dtype(values * effective, torch.bfloat16)
    kept = dequantized.to(torch.bfloat16).flatten(-2) if keep_values else None
    return codes.to(torch.uint8).flatten(-2), error_partials(x, dequantized, -1), kept


def _nvfp4_dequant_kernel(
    nibbles: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor
) -> torch.Tensor:
    """nibbles (rows, groups, 16), fp8 scale (rows, groups, 1) -> bf16 weight.

    As compressed-tensors decompresses: E2M1 value * (scale / global), rounded to bf16.
    """
    values = nibble_values(nibbles) * (scale.float() / global_scale)
    return round_to_dtype(values, torch.bfloat16).to(torch.bfloat16)


def nibble_values(nibbles: torch.Tensor) -> torch.Tensor:
    """Nibbles -> E2M1 values (float32) without a lookup table, so kernels can fuse it."""
    index = (nibbles & 0x7).float()
    # index 0..4 -> 0, .5, 1, 1.5, 2 (index/2); 4..6 -> 2, 3, 4 (index - 2); 7 -> 6 (2 index - 8):
    # the largest of the three lines, arithmetic rather than `torch.where` (slow on the CPU).
    magnitude = torch.maximum(torch.maximum(index * 0.5, index - 2.0), index * 2.0 - 8.0)
    return magnitude * (1.0 - 2.0 * (nibbles >> 3 & 1).float())  # -0.0 for nibble 8, as stored


def nvfp4_grid(global_scale: torch.Tensor) -> Grid:
    """E2M1 values; effective block scales (block scale / global) whose block scale is an E4M3 value.

    The global scale stays RTN's: fused partners must share it, and it only sets FP8's range.
    """
    return Grid(
        values=lambda y: fp4_values(y.clamp(-FP4_MAX, FP4_MAX)),
        store=lambda s: to_e4m3((s * global_scale).clamp(max=FP8_MAX))[1] / global_scale,
    )


def quantize(
    weight: torch.Tensor,
    scheme: QuantScheme,
    compile: bool | None = None,
    global_absmax: torch.Tensor | None = None,
    method: str = "rtn",
    keep_dequantized: bool = False,
) -> FormatResult:
    rows, columns = weight.shape
    if global_absmax is None:
        global_absmax = maybe_compiled(signed_absmax, weight.numel(), compile)(weight, (0, 1))
    global_scale = global_scale_for(global_absmax.to(weight.dtype).reshape(()))
    grouped = group_view(weight, scheme.group_size)
    # Two kernels, so each block's scale is computed once, not again for every element.
    scale, scale_codes, absmax = maybe_compiled(_nvfp4_scales, weight.numel(), compile)(grouped, global_scale)
    if method != "rtn":
        effective = refine_scale(
            method, grouped, scale / global_scale, nvfp4_grid(global_scale), compiles(weight.numel(), compile)
        )
        scale_codes, scale = to_e4m3((effective * global_scale).clamp(max=FP8_MAX))
    nibbles, error, kept = maybe_compiled(_nvfp4_codes, weight.numel(), compile)(
        grouped, scale, global_scale, keep_dequantized
    )
    stored = {
        "weight_packed": pack_nibbles(nibbles.reshape(rows, columns)),
        "weight_scale": scale_codes.reshape(rows, -1).view(torch.float8_e4m3fn),
        "weight_global_scale": global_scale,
    }
    return stored, absmax, error, kept


def dequantize(
    stored: dict[str, torch.Tensor], scheme: QuantScheme, compile: bool | None = None
) -> torch.Tensor:
    nibbles = unpack_nibbles(stored["weight_packed"])
    rows, columns = nibbles.shape
    kernel = maybe_compiled(_nvfp4_dequant_kernel, nibbles.numel(), compile)
    values = kernel(
        group_view(nibbles, scheme.group_size),
        stored["weight_scale"].unsqueeze(-1),
        stored["weight_global_scale"],
    )
    return values.reshape(rows, columns)
