"""What a work unit says about a quantized source tensor: its format and every byte range it needs.

A quantized source weight is several tensors (fp8 weight and its tile scales; a packed weight, its
scales and shape), possibly in different files. The planner pairs them; a job then names all of
them as `SourcePart`s, so a worker reads the parts, dequantizes and never looks anything up.
Slotted frozen dataclasses like `TensorJob`: a plan holds a million of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantizers import QuantScheme

__all__ = ["SourceFormat", "SourcePart", "CARRIED_OVER"]

CARRIED_OVER = "carried over, exact"


@dataclass(frozen=True, slots=True)
class SourceFormat:
    """How a source weight is stored: `kind` is one of `quantizers.sources.SOURCE_KINDS`."""

    kind: str
    block: tuple[int, int] | None = None  # block-FP8's tile
    scheme: QuantScheme | None = None  # a compressed-tensors source's scheme

    def describe(self) -> str:
        if self.kind == "block-fp8" and self.block is not None:
            return f"block-FP8 {self.block[0]}x{self.block[1]}"
        if self.kind == "mxfp4-blocks":
            return "MXFP4 blocks (gpt-oss)"
        if self.scheme is not None:
            return f"compressed-tensors {self.scheme.describe()}"
        return self.kind


@dataclass(frozen=True, slots=True)
class SourcePart:
    """One stored tensor of a quantized source weight; `role` is what the dequantizer calls it."""

    role: str
    name: str
    file: str
    begin: int
    end: int
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
