"""mxfp4-pack-quantized: E2M1 values in blocks of 32 sharing a power-of-two (E8M0) scale.

Stored per Linear: weight_packed uint8 (out, in/2), weight_scale uint8 (out, in/32) holding a
biased exponent e, the scale being 2^(e-127).

The exponent follows compressed-tensors, which differs from the plain OCP rule
floor(log2(amax)) - 2: the block absmax is first rounded to a power of two, up when its mantissa
is 0.75 or more (1.75 * 2^k -> 2^(k+1)), which keeps large values from clipping at 6.
"""

from __future__ import annotations

import torch

from quantizers.formats._common import eps_of, group_view, signed_absmax
from quantizers.formats.nvfp4 import FP4_MAX, unpack_nibble_values
from quantizers.kernels import maybe_compiled
from quantizers.packing import fp4_nibbles, pack_nibbles, unpack_fp4
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


def _mxfp4_kernel(
    grouped: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grouped (rows, groups, 32) -> packed (rows, cols/2), E8M0 exponents, dequantized, absmax."""
    dtype = grouped.dtype
    absmax = signed_absmax(grouped, -1)
    power = _round_to_power_of_two(absmax)
    exponent = (torch.log2(power.float()).floor() + (127 - _ELEMENT_EXPONENT)).to(dtype)
    exponent = exponent.float().clamp(0, 255).round()
    scale = torch.exp2(exponent - 127).to(dtype)
    scale = torch.where(scale == 0, eps_of(torch.uint8), scale)
    stored_exponent = (torch.log2(scale.float()).floor() + 127).to(torch.int32).to(torch.uint8)
    scaled = (grouped.float() / scale.float()).to(dtype).float().clamp(-FP4_MAX, FP4_MAX)
    nibbles = fp4_nibbles(scaled).flatten(-2)
    values = unpack_nibble_values(nibbles).unflatten(-1, grouped.shape[-2:])
    # What compressed-tensors decompresses to: bf16 scale 2^(e-127) times bf16 values.
    decoded_scale = torch.exp2(stored_exponent.float() - 127).to(torch.bfloat16).float()
    dequantized = (values * decoded_scale).to(torch.bfloat16)
    return pack_nibbles(nibbles), stored_exponent, dequantized, absmax


def quantize(
    weight: torch.Tensor, scheme: QuantScheme, compile: bool | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    kernel = maybe_compiled(_mxfp4_kernel, weight.numel(), compile)
    packed, exponent, dequantized, absmax = kernel(group_view(weight, scheme.group_size))
    stored = {"weight_packed": packed, "weight_scale": exponent.reshape(rows, -1).contiguous()}
    return stored, dequantized.reshape(rows, columns), absmax


def dequantize(stored: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    values = unpack_fp4(stored["weight_packed"], torch.float32)
    rows, columns = values.shape
    assert scheme.group_size is not None
    scale = torch.exp2(stored["weight_scale"].float() - 127).to(torch.bfloat16).float()
    grouped = values.unflatten(-1, (-1, scheme.group_size)) * scale.unsqueeze(-1)
    return grouped.reshape(rows, columns).to(torch.bfloat16)
