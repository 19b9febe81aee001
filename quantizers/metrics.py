"""How far a dequantized weight is from its original: SQNR, relative error, cosine, max error.

Computed over row chunks: each chunk's per-row sums are taken in float32 by one fused (compiled,
for large weights) kernel and added up in float64, so no full float copy of a multi-GB weight is
ever made and the pass is bound by memory bandwidth.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict

from quantizers.kernels import maybe_compiled

__all__ = ["WeightError", "weight_error", "error_from_partials"]

_CHUNK_ELEMENTS = 1 << 22


class WeightError(BaseModel):
    """Error figures of one weight against its original."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sqnr_db: float
    relative_error: float
    cosine: float
    max_abs_error: float

    def fails(self, *, min_sqnr_db: float) -> bool:
        return not self.sqnr_db >= min_sqnr_db


def _row_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: sum a^2, sum (a-b)^2, sum a*b, sum b^2 (float32, rows x 4); and max |a-b|."""
    x = a.float()
    y = b.float()
    d = x - y
    sums = torch.stack(((x * x).sum(1), (d * d).sum(1), (x * y).sum(1), (y * y).sum(1)), dim=1)
    return sums, d.abs().amax()


def weight_error(original: torch.Tensor, dequantized: torch.Tensor) -> WeightError:
    """Compare two same-shaped tensors (any float dtypes, same device).

    SQNR = 10*log10(||w||^2 / ||w - w'||^2) (inf when identical); relative error is the relative
    Frobenius norm ||w - w'|| / ||w||; cosine treats both as flat vectors.
    """
    if original.shape != dequantized.shape:
        raise ValueError(f"shapes differ: {list(original.shape)} vs {list(dequantized.shape)}")
    flat_a = original.reshape(original.shape[0], -1) if original.dim() else original.reshape(1, 1)
    flat_b = dequantized.reshape(flat_a.shape)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, flat_a.shape[1]))
    kernel = maybe_compiled(_row_sums, flat_a.numel())
    totals = torch.zeros(4, dtype=torch.float64, device=flat_a.device)
    max_abs = 0.0
    if flat_a.numel():
        for start in range(0, flat_a.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            sums, chunk_max = kernel(flat_a[rows], flat_b[rows])
            totals += sums.double().sum(0)
            max_abs = max(max_abs, float(chunk_max))
    signal, noise, dot, other = (float(v) for v in totals)
    return _figures(signal, noise, dot, other, max_abs)


def error_from_partials(
    signal: torch.Tensor, noise: torch.Tensor, cross: torch.Tensor, max_abs: torch.Tensor
) -> WeightError:
    """WeightError from partial sums of x^2, d^2 and x*d (d = x - x') and partial max |d|.

    The quantization kernels produce these per group; summing them in float64 gives the same
    figures as `weight_error` on the dequantized weight, without materialising it.
    """
    s, n, c = (float(t.double().sum()) for t in (signal, noise, cross))
    largest = float(max_abs.max()) if max_abs.numel() else 0.0
    dot = s - c  # sum x*x' = sum x^2 - sum x*d
    other = s - 2 * c + n  # sum x'^2 = sum (x - d)^2
    return _figures(s, n, dot, max(other, 0.0), largest)


def _figures(signal: float, noise: float, dot: float, other: float, max_abs: float) -> WeightError:
    if noise == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    relative = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    denominator = math.sqrt(signal) * math.sqrt(other)
    cosine = dot / denominator if denominator > 0 else (1.0 if signal == other == 0 else 0.0)
    return WeightError(sqnr_db=sqnr, relative_error=relative, cosine=cosine, max_abs_error=max_abs)
