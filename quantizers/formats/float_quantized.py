"""float-quantized: FP8 (E4M3) weights with one scale per output channel or per 128x128 tile.

Stored per Linear: weight float8_e4m3fn (out, in) and weight_scale in the weight's dtype,
(out, 1) for FP8 or (ceil(out/128), ceil(in/128)) for FP8_BLOCK. Edge tiles are partial: the
weight is viewed as padded with zeros, which changes no tile's absmax.
"""

from __future__ import annotations

import math

import torch

from quantizers.formats._common import (
    CodesResult,
    FormatResult,
    eps_of,
    error_partials,
    exact_quotient,
    round_to_dtype,
    signed_absmax,
)
from quantizers.formats.fp8_bits import e4m3_values, from_e4m3, to_e4m3
from quantizers.kernels import compiles, maybe_compiled
from quantizers.methods import Grid, refine_scale
from quantizers.scheme import QuantScheme

__all__ = ["quantize", "dequantize", "fp8_grid", "FP8_MAX"]

FP8_MAX = 448.0


def _fp8_scales(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tiles (R, tile_rows, C, tile_cols) -> scale (float32, (R, 1, C, 1)) and absmax."""
    dtype = tiles.dtype
    absmax = signed_absmax(tiles, (1, 3))
    scale = round_to_dtype(exact_quotient(absmax.float(), FP8_MAX), dtype)
    return torch.where(scale == 0, eps_of(dtype), scale), absmax


def _fp8_codes(
    tiles: torch.Tensor, scale: torch.Tensor, keep_values: bool
) -> CodesResult:
    """E4M3 codes (uint8) of every element, the error partial sums per tile and, with
    `keep_values`, the dequantized tiles (what `dequantize` returns, without a second pass)."""
    dtype = tiles.dtype
    x = tiles.float()
    scaled = round_to_dtype(x / scale, dtype).clamp(-FP8_MAX, FP8_MAX)
    codes, values = to_e4m3(scaled)
    dequantized = round_to_dtype(values * scale, dtype)
    kept = dequantized.to(dtype) if keep_values else None
    return codes, error_partials(x, dequantized, (1, 3)), kept


def _fp8_dequant_kernel(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return round_to_dtype(from_e4m3(codes) * scale.float(), scale.dtype).to(scale.dtype)


def _tile_shape(scheme: QuantScheme, columns: int) -> tuple[int, int]:
    if scheme.strategy == "block":
        assert scheme.block_structure is not None
        return scheme.block_structure
    return 1, columns


def _as_tiles(weight: torch.Tensor, tile_rows: int, tile_cols: int) -> torch.Tensor:
    rows, columns = weight.shape
    pad_rows = math.ceil(rows / tile_rows) * tile_rows - rows
    pad_cols = math.ceil(columns / tile_cols) * tile_cols - columns
    if pad_rows or pad_cols:
        weight = torch.nn.functional.pad(weight, (0, pad_cols, 0, pad_rows))
    r, c = weight.shape
    # (r, c) -> (r/th, th, c/tw, tw): a tile is [i, :, j, :].
    return weight.reshape(r // tile_rows, tile_rows, c // tile_cols, tile_cols)


def _from_tiles(tiles: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    r = tiles.shape[0] * tiles.shape[1]
    c = tiles.shape[2] * tiles.shape[3]
    return tiles.reshape(r, c)[:rows, :columns]


def fp8_grid(dtype: torch.dtype) -> Grid:
    """E4M3 values; scales stored in the weight's dtype."""
    return Grid(
        values=lambda y: e4m3_values(y.clamp(-FP8_MAX, FP8_MAX)),
        store=lambda s: round_to_dtype(s, dtype),
    )


def quantize(
    weight: torch.Tensor,
    scheme: QuantScheme,
    compile: bool | None = None,
    method: str = "rtn",
    keep_dequantized: bool = False,
) -> FormatResult:
    rows, columns = weight.shape
    tile_rows, tile_cols = _tile_shape(scheme, columns)
    tiles = _as_tiles(weight, tile_rows, tile_cols)
    # Two kernels, so each tile's scale is computed once, not again for every element.
    scale, absmax = maybe_compiled(_fp8_scales, weight.numel(), compile)(tiles)
    if method != "rtn":
        # (R, th, C, tw) -> (R, C, th*tw): one group per tile; padding zeros add no error.
        r, th, c, tw = tiles.shape
        grouped = tiles.permute(0, 2, 1, 3).reshape(r, c, th * tw)
        refined = refine_scale(
            method, grouped, scale.reshape(r, c, 1), fp8_grid(weight.dtype), compiles(weight.numel(), compile)
        )
        scale = refined.reshape(r, 1, c, 1)
    q, error, kept = maybe_compiled(_fp8_codes, weight.numel(), compile)(tiles, scale, keep_dequantized)
    stored = {
        "weight": _from_tiles(q, rows, columns).contiguous().view(torch.float8_e4m3fn),
        "weight_scale": scale.reshape(scale.shape[0], scale.shape[2]).to(weight.dtype),
    }
    return stored, absmax, error, None if kept is None else _from_tiles(kept, rows, columns).contiguous()


def dequantize(
    stored: dict[str, torch.Tensor], scheme: QuantScheme, compile: bool | None = None
) -> torch.Tensor:
    q = stored["weight"]
    scale = stored["weight_scale"]
    rows, columns = q.shape
    tile_rows, tile_cols = _tile_shape(scheme, columns)
    tiles = _as_tiles(q.view(torch.uint8), tile_rows, tile_cols)
    kernel = maybe_compiled(_fp8_dequant_kernel, q.numel(), compile)
    values = kernel(tiles, scale.reshape(scale.shape[0], 1, scale.shape[1], 1))
    return _from_tiles(values, rows, columns).contiguous()
