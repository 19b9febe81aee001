"""pack-quantized: int4/int8 weights packed into int32 words (W4A16, W8A16, W4A16_ASYM).

Stored per Linear: weight_packed int32 (out, ceil(in*b/32)), weight_scale in the weight's dtype
(out, in/group) or (out, 1), weight_shape int64 [out, in], and for asymmetric schemes
weight_zero_point int32 packed along dim 0, (ceil(out*b/32), groups).

The arithmetic mirrors compressed-tensors step by step, including where eager torch rounds to the
weight's dtype (scale = absmax / 7.5 in bf16, x / scale in bf16), so stored bytes are identical.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import torch

from quantizers.formats._common import (
    CodesResult,
    FormatResult,
    eps_of,
    error_partials,
    exact_quotient,
    group_view,
    round_to_dtype,
)
from quantizers.kernels import compiles, maybe_compiled
from quantizers.methods import Grid, refine_asymmetric, refine_scale
from quantizers.packing import (
    pack_codes,
    pack_int_along_rows,
    unpack_codes,
    unpack_int_along_rows,
)
from quantizers.scheme import QuantScheme

__all__ = ["quantize", "dequantize", "int_grid"]


class _IntKernels(NamedTuple):
    scales: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    codes: Callable[..., CodesResult]
    dequant: Callable[..., torch.Tensor]


@cache
def _int_kernels(num_bits: int) -> _IntKernels:
    """The three kernels for one bit width, with its integer range baked in as constants.

    The range is computed here, outside the functions that get compiled: with `num_bits` as an
    argument, Dynamo (dynamic shapes) makes it a symbolic int, and torch 2.11 fails to trace
    `1 << (num_bits - 1)` on one, so every int scheme fell back to eager. Cached, so each bit
    width has one set of function objects and compiles once per process.
    """
    q_min, q_max = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    half_range = (q_max - q_min) / 2

    def _int_scales(
        grouped: torch.Tensor, symmetric: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """grouped (rows, groups, size) -> scale and zero point (float32, (rows, groups, 1)), absmax."""
        dtype = grouped.dtype
        low = grouped.amin(dim=-1, keepdim=True).clamp(max=0)
        high = grouped.amax(dim=-1, keepdim=True).clamp(min=0)
        absmax = torch.maximum(-low, high)
        if symmetric:
            scale = round_to_dtype(exact_quotient(absmax.float(), half_range), dtype)
            return torch.where(scale == 0, eps_of(dtype), scale), torch.zeros_like(scale), absmax
        spread = round_to_dtype(high.float() - low.float(), dtype)
        raw_scale = round_to_dtype(exact_quotient(spread, q_max - q_min), dtype)
        # The zero point comes from the scale before zeros are replaced (all-zero groups: 0/0).
        zero = round_to_dtype(q_min - round_to_dtype(exact_quotient(low.float(), raw_scale), dtype), dtype)
        zero = torch.nan_to_num(zero, nan=0.0).clamp(q_min, q_max).round()
        return torch.where(raw_scale == 0, eps_of(dtype), raw_scale), zero, absmax

    def _int_codes(
        grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool, keep_values: bool
    ) -> CodesResult:
        """Codes uint8 (q + 2^(b-1)) of every element, the error partial sums per group and, with
        `keep_values`, the dequantized weight (what `dequantize` returns, without a second pass)."""
        dtype = grouped.dtype
        x = grouped.float()
        scaled = round_to_dtype(x / scale, dtype)
        if not symmetric:
            scaled = round_to_dtype(scaled + zero, dtype)
        q = scaled.clamp(q_min, q_max).round()
        # What compressed-tensors decompresses to: (q - zero) * scale, rounded to the weight's dtype.
        dequantized = round_to_dtype((q - zero) * scale, dtype)
        kept = dequantized.to(dtype) if keep_values else None
        return (q - q_min).to(torch.uint8), error_partials(x, dequantized, -1), kept

    def _int_dequant_kernel(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """codes (rows, groups, size), scale and zero (rows, groups, 1) -> weight in scale's dtype."""
        q = codes.float() + q_min
        return round_to_dtype((q - zero.float()) * scale.float(), scale.dtype).to(scale.dtype)

    return _IntKernels(_int_scales, _int_codes, _int_dequant_kernel)


def int_grid(num_bits: int, dtype: torch.dtype) -> Grid:
    """Integer codes in [-2^(b-1), 2^(b-1)-1]; scales stored in the weight's dtype."""
    q_min, q_max = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    return Grid(
        values=lambda y: y.round().clamp(q_min, q_max),
        store=lambda s: round_to_dtype(s, dtype),
        q_min=q_min, q_max=q_max,
    )


def quantize(
    weight: torch.Tensor,
    scheme: QuantScheme,
    compile: bool | None = None,
    method: str = "rtn",
    keep_dequantized: bool = False,
) -> FormatResult:
    rows, columns = weight.shape
    grouped = group_view(weight, scheme.group_size)
    # Two kernels, so the per-group scale is computed once, not again for every element.
    kernels = _int_kernels(scheme.num_bits)
    scales = maybe_compiled(kernels.scales, weight.numel(), compile)
    scale, zero, absmax = scales(grouped, scheme.symmetric)
    if method != "rtn":  # RTN's parameters are the starting point (see quantizers.methods)
        grid = int_grid(scheme.num_bits, weight.dtype)
        compiled = compiles(weight.numel(), compile)
        if scheme.symmetric:
            scale = refine_scale(method, grouped, scale, grid, compiled)
        else:
            scale, zero = refine_asymmetric(method, grouped, scale, zero, grid, compiled)
    codes_of = maybe_compiled(kernels.codes, weight.numel(), compile)
    codes, error, kept = codes_of(grouped, scale, zero, scheme.symmetric, keep_dequantized)
    stored = {
        "weight_packed": pack_codes(codes.reshape(rows, columns), scheme.num_bits),
        "weight_scale": scale.reshape(rows, -1).to(weight.dtype),
        "weight_shape": torch.tensor([rows, columns], dtype=torch.int64, device=weight.device),
    }
    if not scheme.symmetric:
        zero_points = zero.reshape(rows, -1).to(torch.int8)
        stored["weight_zero_point"] = pack_int_along_rows(zero_points, scheme.num_bits)
    return stored, absmax, error, None if kept is None else kept.reshape(rows, columns)


def dequantize(
    stored: dict[str, torch.Tensor], scheme: QuantScheme, compile: bool | None = None
) -> torch.Tensor:
    rows, columns = (int(v) for v in stored["weight_shape"].tolist())
    scale = stored["weight_scale"]
    codes = unpack_codes(stored["weight_packed"], scheme.num_bits, columns)
    if scheme.symmetric:
        zero = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    else:
        zero = unpack_int_along_rows(stored["weight_zero_point"], scheme.num_bits, rows)
    kernel = maybe_compiled(_int_kernels(scheme.num_bits).dequant, rows * columns, compile)
    values = kernel(group_view(codes, scheme.group_size), scale.unsqueeze(-1), zero.unsqueeze(-1))
    return values.reshape(rows, columns)
