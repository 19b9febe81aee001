"""mxfp4-pack-quantized: E2M1 values in blocks of 32 sharing a power-of-two (E8M0) scale.

Stored per Linear: weight_packed uint8 (out, in/2), weight_scale uint8 (out, in/32) holding a
biased exponent e, the scale being 2^(e-127).

The exponent follows compressed-tensors, which differs from the plain OCP rule
floor(log2(amax)) - 2: the block absmax is first rounded to a power of two, up when its mantissa
is 0.75 or more (1.75 * 2^k -> 2^(k+1)), which keeps large values from clipping at 6.
"""

from __future__ import annotations

import torch

from quantizers.formats._common import (
    CodesResult,
    FormatResult,
    eps_of,
    error_partials,
    exponent_of_power_of_two,
    group_view,
    power_of_two,
    round_to_dtype,
    signed_absmax,
)
from quantizers.formats.nvfp4 import FP4_MAX, nibble_values
from quantizers.kernels import maybe_compiled
from quantizers.packing import fp4_codes, pack_nibbles, unpack_nibbles
from quantizers.scheme import QuantScheme

__all__ = ["quantize", "dequantize"]

# Largest E2M1 exponent: 6 = 1.5 * 2^2.
_ELEMENT_EXPONENT = 2

_BITS = {
    torch.bfloat16: (torch.int16, 7, 8),
    torch.float16: (torch.int16, 10, 5),
    torch.float32: (torch.int32, 23, 8),
}


def _round_to_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """Power of two nearest `values` (>= 0) by adding a quarter ulp of the leading bit and masking."""
    int_dtype, mantissa, exponent = _BITS[values.dtype]
    bits = values.view(int_dtype).to(torch.int32)
    if int_dtype == torch.int16:
        bits = bits & 0xFFFF
    half_quarter = 1 << (mantissa - 1 - 1)  # E2M1 has one mantissa bit
    sign_exponent_mask = ((1 << (exponent + 1)) - 1) << mantissa
    rounded = (bits + half_quarter) & sign_exponent_mask
    if int_dtype == torch.int16:
        return rounded.to(torch.int16).view(values.dtype)
    return rounded.view(values.dtype)


def _mxfp4_scales(
    grouped: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grouped (rows, groups, 32) -> scale, the scale compressed-tensors decodes, E8M0, absmax."""
    dtype = grouped.dtype
    absmax = signed_absmax(grouped, -1)
    power = _round_to_power_of_two(absmax)
    # compressed-tensors: floor(log2(power)) + 125, clamped to [0, 255], then 2^(e - 127) and back
    # through log2. Here on the bits (exact integers; GPU log2/exp2 are approximate and flush
    # subnormals): the same values wherever torch's log2/exp2 are exact, which CPUs are.
    biased = exponent_of_power_of_two(power.float())
    exponent = torch.where(biased == 255, 255, biased - _ELEMENT_EXPONENT).clamp(0, 255)
    scale = round_to_dtype(power_of_two(exponent), dtype)
    scale = torch.where(scale == 0, eps_of(torch.uint8), scale)
    stored_exponent = exponent_of_power_of_two(scale).clamp(0, 255).to(torch.uint8)
    decoded_scale = round_to_dtype(power_of_two(stored_exponent), torch.bfloat16)
    return scale, decoded_scale, stored_exponent, absmax


def _mxfp4_codes(
    grouped: torch.Tensor, scale: torch.Tensor, decoded_scale: torch.Tensor, keep_values: bool
) -> CodesResult:
    """Nibbles (rows, cols) of every element, the error partial sums per block and, with
    `keep_values`, the dequantized weight (rows, cols) (what `dequantize` returns)."""
    x = grouped.float()
    codes, values = fp4_codes(round_to_dtype(x / scale, grouped.dtype).clamp(-FP4_MAX, FP4_MAX))
    # What compressed-tensors decompresses to: bf16 2^(e-127) times the E2M1 value, in bf16.
    dequantized = round_to_dtype(values * decoded_scale, torch.bfloat16)
    kept = dequantized.to(torch.bfloat16).flatten(-2) if keep_values else None
    return codes.to(torch.uint8).flatten(-2), error_partials(x, dequantized, -1), kept


def _mxfp4_dequant_kernel(nibbles: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """As compressed-tensors decompresses: bf16 scale 2^(e-127) times bf16 E2M1 values."""
    scale = round_to_dtype(power_of_two(exponent), torch.bfloat16)
    return round_to_dtype(nibble_values(nibbles) * scale, torch.bfloat16).to(torch.bfloat16)


def quantize(
    weight: torch.Tensor, scheme: QuantScheme, compile: bool | None = None, keep_dequantized: bool = False
) -> FormatResult:
    rows, columns = weight.shape
    grouped = group_view(weight, scheme.group_size)
    # Two kernels, so each block's scale is computed once, not again for every element.
    scale, decoded, exponent, absmax = maybe_compiled(_mxfp4_scales, weight.numel(), compile)(grouped)
    nibbles, error, kept = maybe_compiled(_mxfp4_codes, weight.numel(), compile)(
        grouped, scale, decoded, keep_dequantized
    )
    stored = {
        "weight_packed": pack_nibbles(nibbles.reshape(rows, columns)),
        "weight_scale": exponent.reshape(rows, -1).contiguous(),
    }
    return stored, absmax, error, kept


def dequantize(
    stored: dict[str, torch.Tensor], scheme: QuantScheme, compile: bool | None = None
) -> torch.Tensor:
    nibbles = unpack_nibbles(stored["weight_packed"])
    rows, columns = nibbles.shape
    kernel = maybe_compiled(_mxfp4_dequant_kernel, nibbles.numel(), compile)
    values = kernel(group_view(nibbles, scheme.group_size), stored["weight_scale"].unsqueeze(-1))
    return values.reshape(rows, columns)
