"""float-quantized: FP8 (E4M3) weights with one scale per output channel or per 128x128 tile.

Stored per Linear: weight float8_e4m3fn (out, in) and weight_scale in the weight's dtype,
(out, 1) for FP8 or (ceil(out/128), ceil(in/128)) for FP8_BLOCK. Edge tiles are partial: the
weight is viewed as padded with zeros, which changes no tile's absmax.
"""

from __future__ import annotations

import math

import torch

from quantizers.formats._common import eps_of, signed_absmax
from quantizers.kernels import maybe_compiled
from quantizers.scheme import QuantScheme

__all__ = ["quantize", "dequantize", "FP8_MAX"]

FP8_MAX = 448.0


def _fp8_kernel(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tiles (R, tile_rows, C, tile_cols) -> fp8 values, scale (R,1,C,1), dequantized, absmax."""
    dtype = tiles.dtype
    absmax = signed_absmax(tiles, (1, 3))
    scale = (absmax.float() / FP8_MAX).to(dtype)
    scale = torch.where(scale == 0, eps_of(dtype), scale)
    scaled = (tiles.float() / scale.float()).to(dtype).float().clamp(-FP8_MAX, FP8_MAX)
    q = scaled.to(torch.float8_e4m3fn)
    dequantized = (q.float() * scale.float()).to(dtype)
    return q, scale, dequantized, absmax


def _tile_shape(scheme: QuantScheme, rows: int, columns: int) -> tuple[int, int]:
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


def quantize(
    weight: torch.Tensor, scheme: QuantScheme, compile: bool | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    tile_rows, tile_cols = _tile_shape(scheme, rows, columns)
    tiles = _as_tiles(weight, tile_rows, tile_cols)
    kernel = maybe_compiled(_fp8_kernel, weight.numel(), compile)
    q, scale, dequantized, absmax = kernel(tiles)
    stored = {
        "weight": _from_tiles(q, rows, columns).contiguous(),
        "weight_scale": scale.reshape(scale.shape[0], scale.shape[2]).contiguous(),
    }
    return stored, _from_tiles(dequantized, rows, columns).contiguous(), absmax


def dequantize(stored: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    q = stored["weight"]
    scale = stored["weight_scale"]
    rows, columns = q.shape
    tile_rows, tile_cols = _tile_shape(scheme, rows, columns)
    # Expand each scale over its tile, then crop the padding away.
    expanded = scale.repeat_interleave(tile_rows, 0).repeat_interleave(tile_cols, 1)
    return (q.float() * expanded[:rows, :columns].float()).to(scale.dtype)
