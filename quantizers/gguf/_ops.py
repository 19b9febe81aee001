"""Scalar-exact building blocks that make the torch quantizers byte-identical to llama.cpp's C.

llama.cpp's reference quantizers (ggml-quants.c) run per block in float32 and accumulate sums in
element order; a vectorised reduction (pairwise, SIMD) rounds differently and can flip a choice
between two candidate scales. So blocks are laid out as columns of a (block length, blocks)
tensor and sums are taken one element row at a time: the same additions in the same order as the
C loop, done for every block at once.
"""

from __future__ import annotations

import torch

__all__ = ["div", "nearest_int", "round_away", "ordered_sum", "fp16_bytes", "fp16_round"]


def div(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> torch.Tensor:
    """A float32 division rounded once, as C's `a / b`.

    `scalar / tensor` in torch is `tensor.reciprocal() * scalar`, two roundings, which picks a
    different code for a few weights in a thousand; both operands are made tensors instead.
    """
    like = numerator if isinstance(numerator, torch.Tensor) else denominator
    assert isinstance(like, torch.Tensor)
    top = numerator if isinstance(numerator, torch.Tensor) else torch.full_like(like, numerator)
    bottom = denominator if isinstance(denominator, torch.Tensor) else torch.full_like(like, denominator)
    return torch.div(top, bottom)


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `nearest_int`: round half to even (its float trick), as int32."""
    return torch.round(values).to(torch.int32)


def round_away(values: torch.Tensor) -> torch.Tensor:
    """C `roundf`: halves away from zero, exactly (no `x + 0.5` rounding error)."""
    whole = torch.trunc(values)
    half_or_more = (values - whole).abs() >= 0.5
    return whole + torch.where(half_or_more, torch.sign(values), torch.zeros_like(values))


def ordered_sum(terms: torch.Tensor) -> torch.Tensor:
    """(n, blocks) -> (blocks,): each column's sum added row by row from 0.0, like `s += t` in C.

    The terms are computed beforehand as whole-tensor products (each element rounded exactly as
    the C expression rounds it); only the additions have to follow the C order.
    """
    rows = terms.unbind(0)  # one call for every row's view, not one indexing per row
    total = rows[0] + 0.0
    for row in rows[1:]:
        total += row
    return total


def fp16_round(values: torch.Tensor) -> torch.Tensor:
    """float32 -> the float32 value of its fp16 rounding (GGML_FP32_TO_FP16 then back)."""
    return values.to(torch.float16).float()


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(blocks,) float32 -> (blocks, 2) uint8: the fp16 little-endian bytes of each value."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)
