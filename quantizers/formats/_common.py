"""Small helpers the format kernels share."""

from __future__ import annotations

import torch

ErrorPartials = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

__all__ = ["group_view", "eps_of", "signed_absmax", "round_to_dtype", "error_partials", "ErrorPartials"]


def group_view(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group_size); a channel strategy is one group per row."""
    columns = weight.shape[-1]
    size = columns if group_size is None else group_size
    return weight.unflatten(-1, (columns // size, size))


def eps_of(dtype: torch.dtype) -> float:
    """The value a zero scale becomes (compressed-tensors: FP8 0.125, ints 1, floats finfo.eps)."""
    if dtype == torch.float8_e4m3fn:
        return 0.125
    if dtype.is_floating_point:
        return torch.finfo(dtype).eps
    return 1.0


def signed_absmax(values: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    """max(|min(x, 0)|, max(x, 0)) over `dims`, kept, in the input dtype (exact: no rounding).

    Two reductions instead of `abs().amax()` so no copy of the weight is made. NaN propagates
    (amax/amin return NaN for a group holding one), which is how non-finite weights are caught.
    """
    low = values.amin(dim=dims, keepdim=True).clamp(max=0)
    high = values.amax(dim=dims, keepdim=True).clamp(min=0)
    return torch.maximum(-low, high)


def round_to_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `values` rounded to `dtype`'s precision, staying float32.

    Eager torch rounds every bf16/fp16 op's result to that dtype; the kernels compute in float32
    and call this where it would, so their results are bit-identical to compressed-tensors'.
    bf16 rounding is done on the bits (round to nearest even): on CPUs without native bf16 a
    real conversion costs several times more, and Inductor could drop a cast pair.
    """
    if dtype == torch.float32:
        return values
    if dtype == torch.bfloat16:
        bits = values.view(torch.int32)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return bits.view(torch.float32)
    return values.to(dtype).float()


def error_partials(
    original: torch.Tensor, dequantized: torch.Tensor, dims: int | tuple[int, ...]
) -> ErrorPartials:
    """Partial sums for the error figures, reduced over `dims` (float32, small).

    sum x^2, sum d^2, sum x*d (d = x - x') and max |d|: from these `metrics.error_from_partials`
    gives SQNR, relative error and cosine. Computed inside the quantization kernels, where both
    operands are already in registers, so measuring the error costs almost nothing; returned as
    separate tensors because stacking them inside a compiled kernel splits its loops.
    """
    difference = original - dequantized
    return (
        (original * original).sum(dim=dims),
        (difference * difference).sum(dim=dims),
        (original * difference).sum(dim=dims),
        difference.abs().amax(dim=dims),
    )
