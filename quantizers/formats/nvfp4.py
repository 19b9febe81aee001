"""nvfp4-pack-quantized: E2M1 values in blocks of 16, FP8 block scales, one fp32 global scale.

Stored per Linear: weight_packed uint8 (out, in/2), weight_scale float8_e4m3fn (out, in/16),
weight_global_scale float32 (1,). The global scale is a multiplier, 448*6/amax(tensor), chosen so
block scales use FP8's whole range; value = fp4 * scale / global.

Fused partners (q/k/v, gate/up) must share one global scale for vLLM: pass `global_absmax`
(the largest absmax of the partners) and every partner gets the same global scale.
"""

from __future__ import annotations

import torch

from quantizers.formats._common import eps_of, group_view, signed_absmax
from quantizers.kernels import maybe_compiled
from quantizers.packing import fp4_nibbles, pack_nibbles, unpack_fp4
from quantizers.scheme import QuantScheme

__all__ = ["quantize", "dequantize", "global_scale_for", "FP4_MAX", "FP8_MAX"]

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


def _nvfp4_kernel(
    grouped: torch.Tensor, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grouped (rows, groups, 16) -> packed (rows, cols/2), fp8 scale, dequantized, absmax."""
    dtype = grouped.dtype
    absmax = signed_absmax(grouped, -1)
    local = (absmax.float() / FP4_MAX).to(dtype)
    scale = (global_scale * local.float()).clamp(-FP8_MAX, FP8_MAX)
    scale = scale.to(torch.float8_e4m3fn).float()
    scale = torch.where(scale == 0, eps_of(torch.float8_e4m3fn), scale)
    effective = scale / global_scale
    scaled = (grouped.float() / effective).clamp(-FP4_MAX, FP4_MAX)
    nibbles = fp4_nibbles(scaled).flatten(-2)
    values = unpack_nibble_values(nibbles)
    dequantized = (values.unflatten(-1, grouped.shape[-2:]) * effective).to(torch.bfloat16)
    return pack_nibbles(nibbles), scale.to(torch.float8_e4m3fn), dequantized, absmax


def unpack_nibble_values(nibbles: torch.Tensor) -> torch.Tensor:
    """Nibbles -> E2M1 values (float32) without a lookup table, so kernels can fuse it."""
    index = (nibbles & 0x7).float()
    # index 0..3 -> 0, .5, 1, 1.5 (index/2); 4..7 -> 2, 3, 4, 6.
    magnitude = torch.where(index < 4, index * 0.5, torch.where(index < 7, index - 2, 6.0))
    return torch.where((nibbles & 0x8) != 0, -magnitude, magnitude)


def quantize(
    weight: torch.Tensor,
    scheme: QuantScheme,
    compile: bool | None = None,
    global_absmax: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    tensor_absmax = signed_absmax(weight, (0, 1)).reshape(()) if global_absmax is None else (
        global_absmax.to(weight.dtype).reshape(())
    )
    global_scale = global_scale_for(tensor_absmax)
    kernel = maybe_compiled(_nvfp4_kernel, weight.numel(), compile)
    packed, scale, dequantized, absmax = kernel(group_view(weight, scheme.group_size), global_scale)
    stored = {
        "weight_packed": packed,
        "weight_scale": scale.reshape(rows, -1).contiguous(),
        "weight_global_scale": global_scale,
    }
    return stored, dequantized.reshape(rows, columns), absmax


def dequantize(stored: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    values = unpack_fp4(stored["weight_packed"], torch.float32)
    rows, columns = values.shape
    assert scheme.group_size is not None
    effective = stored["weight_scale"].float() / stored["weight_global_scale"]
    grouped = values.unflatten(-1, (-1, scheme.group_size)) * effective.unsqueeze(-1)
    return grouped.reshape(rows, columns).to(torch.bfloat16)
