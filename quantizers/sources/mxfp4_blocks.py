"""gpt-oss MXFP4 sources: `<name>_blocks` uint8 (..., G, 16) and `<name>_scales` uint8 (..., G).

Each byte holds two E2M1 values, the low nibble first; each group of 32 values shares the scale
2^(e - 127) (E8M0). The result has the blocks' leading dimensions and G*32 columns, e.g. gpt-oss's
`gate_up_proj` [E, 2I, H] (transformers transposes it to its [E, H, 2I] parameter after loading).
"""

from __future__ import annotations

import torch

from quantizers.errors import InvalidSourceError
from quantizers.formats.nvfp4 import nibble_values

__all__ = ["dequantize"]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, *, name: str = "weight") -> torch.Tensor:
    """(…, G, 16) bytes and (…, G) exponents -> float32 (…, G*32)."""
    if blocks.dtype != torch.uint8 or blocks.dim() < 2 or blocks.shape[-1] != 16:
        raise InvalidSourceError(
            f"{name}: MXFP4 blocks are uint8 (..., groups, 16), got "
            f"{str(blocks.dtype).removeprefix('torch.')} of shape {list(blocks.shape)}"
        )
    if scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise InvalidSourceError(
            f"{name}: MXFP4 scales have shape {list(scales.shape)}, expected uint8 {list(blocks.shape[:-1])} "
            "(one E8M0 exponent per 32 values)"
        )
    low = nibble_values(blocks & 0x0F)
    high = nibble_values(blocks >> 4)
    values = torch.stack((low, high), dim=-1).flatten(-2)  # (..., G, 32), low nibble first
    values = values * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return values.flatten(-2)
