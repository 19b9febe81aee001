"""Q8_0, llama.cpp's 32-weight blocks with one fp16 scale (8.5 bits per weight).

Block layout (34 bytes): d (fp16), then 32 int8 codes; x = d * q. Follows `quantize_row_q8_0_ref`:
d = absmax / 127 in float32, codes = roundf(x * (1 / d)) -- the scale used to round is the
float32 one, the stored one its fp16 rounding.

Q5_0 and Q5_1 (the fallbacks llama.cpp uses for Q4_K / Q5_K when a row is not a multiple of 256)
come from the `gguf` package's numpy quantizers, which follow the same reference code.
"""

from __future__ import annotations

import numpy as np
import torch

from quantizers.gguf._ops import div, fp16_bytes, round_away

__all__ = ["quantize_q8_0", "quantize_with_gguf"]

BLOCK = 32


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weight, cols % 32 == 0 -> (rows, cols / 32 * 34) uint8 Q8_0 blocks."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(-1, BLOCK)  # (rows * cols / 32, 32)
    amax = blocks.abs().amax(dim=1)
    scale = div(amax, 127.0)
    inverse = torch.where(scale != 0, div(1.0, torch.where(scale != 0, scale, 1.0)), 0.0)
    codes = round_away(blocks * inverse[:, None]).to(torch.int8).view(torch.uint8)
    packed = torch.cat((fp16_bytes(scale), codes), dim=1)  # (blocks, 34)
    return packed.reshape(rows, cols // BLOCK * 34)


def quantize_with_gguf(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """Types quantfleet does not implement itself (Q5_0, Q5_1), through the `gguf` package."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    array = weight.detach().float().cpu().numpy()
    packed = np.ascontiguousarray(gguf.quants.quantize(array, qtype))
    return torch.from_numpy(packed).to(weight.device)
