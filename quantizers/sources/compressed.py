"""compressed-tensors sources: the formats quantfleet itself writes, read back with its own
dequantizers (`quantizers.formats.*`), so a checkpoint we (or llm-compressor) produced can be
re-quantized to another scheme without a dense copy."""

from __future__ import annotations

import torch

from quantizers.errors import InvalidSourceError
from quantizers.formats import format_module
from quantizers.scheme import QuantScheme
from quantizers.shapes import stored_specs

__all__ = ["dequantize", "logical_shape"]


def logical_shape(scheme: QuantScheme, suffix_shapes: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """The dense weight's (out, in) from the stored tensors' shapes alone (headers), or None.

    Packed int rows may be padded to whole 32-bit words: the group count then pins the columns;
    the worker still checks `weight_shape` against it.
    """
    if scheme.format == "float-quantized":
        shape = suffix_shapes.get("weight")
        return (shape[0], shape[1]) if shape is not None and len(shape) == 2 else None
    packed = suffix_shapes.get("weight_packed")
    if packed is None or len(packed) != 2:
        return None
    if scheme.format == "pack-quantized":
        columns = packed[1] * 32 // scheme.num_bits
        scale = suffix_shapes.get("weight_scale")
        if scheme.group_size is not None and scale is not None and len(scale) == 2:
            columns = min(columns, scale[1] * scheme.group_size)
        return packed[0], columns
    return packed[0], packed[1] * 2


def dequantize(parts: dict[str, torch.Tensor], scheme: QuantScheme, *, name: str = "weight") -> torch.Tensor:
    """Stored tensors by suffix -> float32 weight, exactly as compressed-tensors decompresses them."""
    shapes = {suffix: tuple(t.shape) for suffix, t in parts.items()}
    dense = logical_shape(scheme, shapes)
    if "weight_shape" in parts:
        rows, columns = (int(v) for v in parts["weight_shape"].tolist())
        dense = (rows, columns)
    if dense is None:
        raise InvalidSourceError(f"{name}: {scheme.format} source without its packed weight")
    for spec in stored_specs(scheme, dense, "float32"):
        got = shapes.get(spec.suffix)
        if got != spec.shape:
            found = "missing" if got is None else f"shape {list(got)}"
            raise InvalidSourceError(
                f"{name}: {spec.suffix} is {found}, expected shape {list(spec.shape)} "
                f"for {scheme.describe()} ({scheme.format}) of a {dense[0]}x{dense[1]} weight"
            )
    return format_module(scheme.format).dequantize(parts, scheme, None).float()
