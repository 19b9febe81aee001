"""pack-quantized: int4/int8 weights packed into int32 words (W4A16, W8A16, W4A16_ASYM).

Stored per Linear: weight_packed int32 (out, ceil(in*b/32)), weight_scale in the weight's dtype
(out, in/group) or (out, 1), weight_shape int64 [out, in], and for asymmetric schemes
weight_zero_point int32 packed along dim 0, (ceil(out*b/32), groups).

The arithmetic mirrors compressed-tensors step by step, including where eager torch rounds to the
weight's dtype (scale = absmax / 7.5 in bf16, x / scale in bf16), so stored bytes are identical.
"""

from __future__ import annotations

import torch

from quantizers.formats._common import eps_of, group_view
from quantizers.kernels import maybe_compiled
from quantizers.packing import (
    pack_int,
    pack_int_along_rows,
    unpack_int,
    unpack_int_along_rows,
)
from quantizers.scheme import QuantScheme

__all__ = ["quantize", "dequantize"]


def _int_kernel(
    grouped: torch.Tensor, num_bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grouped (rows, groups, size) -> q int8, scale, zero point int8, dequantized, absmax."""
    dtype = grouped.dtype
    q_min, q_max = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    # Kept (rows, groups, 1) so they broadcast over each group.
    low = grouped.amin(dim=-1, keepdim=True).clamp(max=0)
    high = grouped.amax(dim=-1, keepdim=True).clamp(min=0)
    absmax = torch.maximum(-low, high)
    x = grouped.float()
    if symmetric:
        scale = (absmax.float() / ((q_max - q_min) / 2)).to(dtype)
        scale = torch.where(scale == 0, eps_of(dtype), scale)
        scaled = (x / scale.float()).to(dtype).float()
        zero = torch.zeros_like(scale, dtype=torch.int8)
    else:
        spread = (high.float() - low.float()).to(dtype)
        raw_scale = (spread.float() / (q_max - q_min)).to(dtype)
        # The zero point comes from the scale before zeros are replaced (all-zero groups: 0/0).
        zero_f = (q_min - (low.float() / raw_scale.float()).to(dtype).float()).to(dtype)
        zero_f = torch.nan_to_num(zero_f.float(), nan=0.0).clamp(q_min, q_max).round()
        zero = zero_f.to(torch.int8)
        scale = torch.where(raw_scale == 0, eps_of(dtype), raw_scale)
        scaled = ((x / scale.float()).to(dtype).float() + zero_f).to(dtype).float()
    q = scaled.clamp(q_min, q_max).round()
    dequantized = ((q - zero.float()).to(dtype).float() * scale.float()).to(dtype)
    return q.to(torch.int8), scale, zero, dequantized, absmax


def quantize(
    weight: torch.Tensor, scheme: QuantScheme, compile: bool | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    grouped = group_view(weight, scheme.group_size)
    kernel = maybe_compiled(_int_kernel, weight.numel(), compile)
    q, scale, zero, dequantized, absmax = kernel(grouped, scheme.num_bits, scheme.symmetric)
    stored = {
        "weight_packed": pack_int(q.reshape(rows, columns), scheme.num_bits),
        "weight_scale": scale.reshape(rows, -1).contiguous(),
        "weight_shape": torch.tensor([rows, columns], dtype=torch.int64, device=weight.device),
    }
    if not scheme.symmetric:
        stored["weight_zero_point"] = pack_int_along_rows(zero.reshape(rows, -1), scheme.num_bits)
    return stored, dequantized.reshape(rows, columns), absmax


def dequantize(stored: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    rows, columns = (int(v) for v in stored["weight_shape"].tolist())
    scale = stored["weight_scale"]
    q = unpack_int(stored["weight_packed"], scheme.num_bits, columns)
    grouped = group_view(q, scheme.group_size).float()
    if scheme.symmetric:
        zero = torch.zeros((), device=q.device)
    else:
        zp = unpack_int_along_rows(stored["weight_zero_point"], scheme.num_bits, rows)
        zero = zp.float().unsqueeze(-1)
    values = (grouped - zero).to(scale.dtype).float() * scale.float().unsqueeze(-1)
    return values.to(scale.dtype).reshape(rows, columns)

