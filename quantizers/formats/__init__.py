"""One module per compressed-tensors format, each a pair of pure functions.

`quantize(weight, scheme, compile, [method,] keep_dequantized=False) -> (stored tensors by suffix,
group absmax, error partial sums, the dequantized weight or None)` and `dequantize(stored, scheme,
compile) -> weight`. The dequantized weight is returned only when asked for; it is what
`dequantize` gives for the stored tensors, written by the same kernel that made them. The
registry below maps a format name to its module.
"""

from __future__ import annotations

from types import ModuleType

from quantizers.formats import float_quantized, mxfp4, nvfp4, pack_quantized

__all__ = ["FORMATS", "format_module"]

FORMATS: dict[str, ModuleType] = {
    "pack-quantized": pack_quantized,
    "float-quantized": float_quantized,
    "nvfp4-pack-quantized": nvfp4,
    "mxfp4-pack-quantized": mxfp4,
}


def format_module(name: str) -> ModuleType:
    return FORMATS[name]
