"""Small helpers the format kernels share."""

from __future__ import annotations

import torch

__all__ = ["group_view", "eps_of", "signed_absmax"]


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
