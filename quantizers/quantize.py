"""The one entry point a worker calls: quantize a 2-D weight with a scheme.

Validates the weight, resolves the scheme for its shape (see `shapes`), runs the format's kernel
and checks the result is finite. Returns the exact tensors compressed-tensors stores plus the
dequantized weight, which is what compressed-tensors itself decompresses them to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantizers.errors import InvalidWeightError
from quantizers.formats import format_module, nvfp4
from quantizers.methods import check_method
from quantizers.metrics import WeightError, error_from_partials
from quantizers.scheme import QuantScheme
from quantizers.shapes import Resolution, resolve_scheme

__all__ = ["QuantizedTensors", "quantize", "dequantize", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class QuantizedTensors:
    """One quantized weight: stored tensors by suffix (`weight_packed`, ...) and its dequantized form.

    `dequantized` is computed on first access (what compressed-tensors decompresses the stored
    tensors to), so callers that only store the result never pay for a full-size copy.
    """

    resolution: Resolution
    tensors: dict[str, torch.Tensor]
    error: WeightError  # measured in the kernel against the exact dequantized values
    method: str = "rtn"  # how the scales were chosen (see quantizers.methods)
    _dequantized: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    @property
    def dequantized(self) -> torch.Tensor:
        if not self._dequantized:
            self._dequantized.append(dequantize(self.tensors, self.scheme))
        return self._dequantized[0]

    @property
    def holds_dequantized(self) -> bool:
        """Whether `dequantized` is at hand (kept by the kernel, or computed since) at no cost."""
        return bool(self._dequantized)

    def release(self) -> None:
        """Drop the cached dequantized weight (the stored tensors stay)."""
        self._dequantized.clear()

    @property
    def scheme(self) -> QuantScheme:
        return self.resolution.scheme

    def named(self, module: str) -> dict[str, torch.Tensor]:
        """Stored tensors under their checkpoint names, e.g. `model.layers.0.mlp.up_proj.weight_scale`."""
        return {f"{module}.{suffix}": t for suffix, t in self.tensors.items()}

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _check_dtype(weight: torch.Tensor, name: str) -> None:
    if weight.dtype not in SUPPORTED_DTYPES:
        raise InvalidWeightError(
            f"{name}: dtype {str(weight.dtype).removeprefix('torch.')} is not quantized; "
            "expected bfloat16, float16 or float32"
        )


def _raise_non_finite(weight: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(weight)
    count = int(bad.sum())
    row, col = (int(i) for i in bad.nonzero()[0].tolist())
    value = float(weight[row, col])
    raise InvalidWeightError(
        f"{name}: {count} non-finite value(s) (first: {value} at row {row}, column {col}); "
        "a weight with NaN or Inf cannot be quantized"
    )


def quantize(
    weight: torch.Tensor,
    scheme: QuantScheme,
    *,
    name: str = "weight",
    compile: bool | None = None,
    global_absmax: torch.Tensor | None = None,
    method: str = "rtn",
    keep_dequantized: bool = False,
) -> QuantizedTensors:
    """Quantize `weight` (2-D, bf16/fp16/fp32) with `scheme`, on the weight's device.

    `name` appears in every error. `compile` forces (True) or forbids (False) the compiled kernel;
    by default large weights use it. `global_absmax` is for NVFP4 partners that share one global
    scale (see `quantizers.formats.nvfp4`). `method` chooses the scales: `rtn` (absmax/min-max,
    compressed-tensors' bytes), `search` or `hqq` (see `quantizers.methods`); the stored format is
    the same. MXFP4's power-of-two scales are always RTN's (the result's `method` says so).
    `keep_dequantized` has the quantization kernel also write the dequantized weight, the values
    `dequantize` would return (an int code's zero may carry the other sign), so a caller that
    needs it (the output-error probes) does not pay a second pass over the weight; it costs one
    weight-sized tensor while the result is held.
    """
    _check_dtype(weight, name)
    method = check_method(method)
    resolution = resolve_scheme(scheme, tuple(weight.shape), name)
    used = resolution.scheme
    module = format_module(used.format)
    with torch.no_grad():
        if used.format == "nvfp4-pack-quantized":
            result = nvfp4.quantize(weight, used, compile, global_absmax, method, keep_dequantized)
        elif used.format == "mxfp4-pack-quantized":
            method = "rtn"  # power-of-two scales: nothing to search
            result = module.quantize(weight, used, compile, keep_dequantized)
        else:
            result = module.quantize(weight, used, compile, method, keep_dequantized)
    stored, absmax, partials, dequantized = result
    # A NaN or Inf anywhere makes its group's absmax non-finite: checking the small absmax
    # tensor costs nothing, and only the error path scans the weight.
    if not bool(torch.isfinite(absmax).all()):
        _raise_non_finite(weight, name)
    return QuantizedTensors(
        resolution=resolution, tensors=stored, error=error_from_partials(*partials), method=method,
        _dequantized=[] if dequantized is None else [dequantized],
    )


def dequantize(
    stored: dict[str, torch.Tensor], scheme: QuantScheme, *, compile: bool | None = None
) -> torch.Tensor:
    """Weight from its stored tensors (by suffix), exactly as compressed-tensors decompresses it:
    in the scale's dtype for int and FP8 formats, in bfloat16 for the FP4 formats."""
    with torch.no_grad():
        return format_module(scheme.format).dequantize(stored, scheme, compile)
