"""What the methods share: a format's grid of storable values, its storable scales, the weighting.

A method never changes what is stored, only the parameters the format kernel then stores with: a
scale per group (and an integer zero point for asymmetric int). So each format is described to the
methods by two functions: `values(y)` rounds scaled weights y = x / s to the values the format can
hold (int codes, E4M3 or E2M1 values), and `store(s)` rounds a candidate scale to one the format can
store (bf16/fp16 for int and FP8 scales, E4M3 relative to the global scale for NVFP4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Grid", "squared_error", "magnitude_weights"]


@dataclass(frozen=True)
class Grid:
    """The values and the scales a format can store (see the module docstring)."""

    values: Callable[[torch.Tensor], torch.Tensor]
    store: Callable[[torch.Tensor], torch.Tensor]
    q_min: float = 0.0  # int only: the code range (where the zero point lives, when asymmetric)
    q_max: float = 0.0

    @property
    def integer(self) -> bool:
        """Integer codes one step apart (int formats): nearest rounding leaves every element that
        is not clipped within half a step of its code."""
        return self.q_max > self.q_min

    def asymmetric_codes(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Asymmetric int: the nearest codes of x for (scale, zero point), clamped to the range."""
        return (x / scale + zero).round().clamp(self.q_min, self.q_max)

    def safe_store(self, candidate: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """`store(candidate)`, or `fallback` where that is not a positive finite scale."""
        stored = self.store(torch.nan_to_num(candidate, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0))
        return torch.where((stored > 0) & torch.isfinite(stored), stored, fallback)


def squared_error(
    x: torch.Tensor, dequantized: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per group (last dim reduced, kept): sum of (weighted) squared reconstruction error."""
    difference = x - dequantized
    squared = difference * difference
    if weights is not None:
        squared = squared * weights
    return squared.sum(dim=-1, keepdim=True)


def magnitude_weights(x: torch.Tensor) -> torch.Tensor:
    """Element weights without data: rms(group) + |x|, llama.cpp's k-quant default.

    quantize_row_q4_K_ref weighs each element by av_x + |x| when there is no importance matrix:
    large weights move a layer's output most, and the rms floor keeps small ones from being
    ignored. An importance matrix (activation statistics) would replace this if one ever exists.
    """
    rms = (x * x).mean(dim=-1, keepdim=True).sqrt()
    return rms + x.abs()
