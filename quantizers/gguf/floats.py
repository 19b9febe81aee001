"""Unquantized GGUF types: F32, F16 and BF16 are the weight's values in that dtype, row-major."""

from __future__ import annotations

import torch

__all__ = ["to_float_bytes"]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def to_float_bytes(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """(rows, cols) weight -> (rows, cols * itemsize) uint8 in GGUF's byte order (little-endian)."""
    converted = weight.to(_DTYPES[type_name]).contiguous()
    return converted.view(torch.uint8).reshape(weight.shape[0], -1)
