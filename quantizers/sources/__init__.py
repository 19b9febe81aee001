"""Dequantizers for quantized SOURCE checkpoints: one module per source format.

A source that is already quantized (DeepSeek/Kimi block-FP8, compressed-tensors, gpt-oss MXFP4)
is turned back into the weight it means, in float32, right before it is quantized to the target,
so no dequantized copy of the checkpoint is ever written. Each module is pure tensor math:
`dequantize(parts, ...) -> float32 weight`, where `parts` maps a role (`weight`,
`weight_scale_inv`, `blocks`, ...) to the tensor read from the source.
"""

from __future__ import annotations

import torch

from quantizers.errors import InvalidSourceError
from quantizers.scheme import QuantScheme
from quantizers.sources import block_fp8, compressed, mxfp4_blocks

__all__ = ["SOURCE_KINDS", "dequantize_source", "block_fp8", "compressed", "mxfp4_blocks"]

# The source formats quantfleet reads, by the name plans and reports use.
SOURCE_KINDS = ("block-fp8", "compressed-tensors", "mxfp4-blocks")


def dequantize_source(
    kind: str,
    parts: dict[str, torch.Tensor],
    *,
    name: str,
    block: tuple[int, int] | None = None,
    scheme: QuantScheme | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight a quantized source tensor means, on the parts' device: computed in float32,
    returned in `dtype` (block-FP8 rounds inside its kernel; others are converted after).

    `name` appears in every error; `block` is block-FP8's tile, `scheme` a compressed-tensors
    source's scheme.
    """
    with torch.no_grad():
        if kind == "block-fp8":
            if block is None:
                raise InvalidSourceError(f"{name}: block-FP8 source without a block size")
            return block_fp8.dequantize(parts["weight"], parts["weight_scale_inv"], block, name=name,
                                        dtype=dtype)
        if kind == "compressed-tensors":
            if scheme is None:
                raise InvalidSourceError(f"{name}: compressed-tensors source without a scheme")
            return compressed.dequantize(parts, scheme, name=name).to(dtype)
        if kind == "mxfp4-blocks":
            blocks, scales = parts["blocks"], parts["scales"]
            if blocks.dim() != 4:
                return mxfp4_blocks.dequantize(blocks, scales, name=name).to(dtype)
            # Fused experts, in transformers' parameter layout [E, in, out]: one expert at a time
            # into the output, so float32 temporaries stay one expert's (gpt-oss-120b's fused
            # gate_up_proj alone is 2.1G values).
            if (blocks.dtype != torch.uint8 or blocks.shape[-1] != 16 or scales.dtype != torch.uint8
                    or tuple(scales.shape) != tuple(blocks.shape[:-1])):
                mxfp4_blocks.dequantize(blocks, scales, name=name)  # raises, naming the tensor
            experts, rows, groups, _ = blocks.shape
            out = torch.empty(experts, groups * 32, rows, dtype=dtype, device=blocks.device)
            for e in range(experts):
                out[e] = mxfp4_blocks.dequantize(blocks[e], scales[e], name=name).t()
            return out
    raise InvalidSourceError(f"{name}: unknown source format {kind!r}; known: {', '.join(SOURCE_KINDS)}")
