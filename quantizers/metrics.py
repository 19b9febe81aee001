"""How far a dequantized weight is from its original: SQNR, relative error, cosine, max error.

Computed over row chunks in float64 accumulators, so at most one chunk's float copy exists at a
time, never a full extra copy of a multi-GB weight.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict

__all__ = ["WeightError", "weight_error"]

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
    signal = noise = dot = other = 0.0
    max_abs = 0.0
    for start in range(0, flat_a.shape[0], rows_per_chunk):
        a = flat_a[start : start + rows_per_chunk].double()
        b = flat_b[start : start + rows_per_chunk].double()
        diff = a - b
        signal += float((a * a).sum())
        noise += float((diff * diff).sum())
        dot += float((a * b).sum())
        other += float((b * b).sum())
        if diff.numel():
            max_abs = max(max_abs, float(diff.abs().max()))
    if noise == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    relative = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    denominator = math.sqrt(signal) * math.sqrt(other)
    cosine = dot / denominator if denominator > 0 else (1.0 if signal == other == 0 else 0.0)
    return WeightError(
        sqnr_db=sqnr, relative_error=relative, cosine=cosine, max_abs_error=max_abs
    )
