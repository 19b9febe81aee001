"""Methods: how a format's scales (and zero points) are chosen, one module per method.

`rtn` is round-to-nearest with absmax (min/max) scales, compressed-tensors' own arithmetic, and
needs nothing here. `search` (`search.py`) and `hqq` (`hqq.py`) start from RTN's parameters and
lower the reconstruction error, without calibration data. None changes the stored format: the
format kernel stores codes rounded to nearest for whatever parameters come back, so outputs load
unchanged in every engine.

A format describes itself to a method as a `Grid` (the values and the scales it can store); the
formats build their grids, so this package depends on nothing in `quantizers.formats`. Work is done
in float32 over chunks of rows, so memory stays a few times one chunk whatever the weight's size.
Everything is element-wise or a reduction over one group: deterministic on a given device type,
and for a given choice of compiled or eager steps (made per weight and plan, as for the format
kernels: `quantizers.kernels`). Compiled, a method's step (one candidate, one iteration) is one
fused loop over the chunk: on 2 CPU cores NVFP4A16 `search` of a 2048x4096 weight takes 0.16 s
instead of 1.4 s eagerly, `hqq` 0.5 s instead of 1.6 s.
"""

from __future__ import annotations

from types import ModuleType

import torch

from quantizers.errors import UnknownMethodError
from quantizers.methods import hqq, search
from quantizers.methods._grid import Grid

__all__ = ["METHODS", "Grid", "check_method", "method_passes", "refine_scale", "refine_asymmetric"]

METHODS = ("rtn", "search", "hqq")
_MODULES: dict[str, ModuleType] = {"search": search, "hqq": hqq}
# Rows are refined a chunk at a time, so memory stays a few times one chunk (float32). On a GPU a
# 1M-element chunk makes each element-wise op a ~3 us kernel behind a ~5-10 us launch: the methods'
# ~150 ops per chunk would be launch-bound, so CUDA takes 16x larger chunks (~1 GB of temporaries).
_CHUNK_ELEMENTS = 1 << 20
_CHUNK_ELEMENTS_CUDA = 1 << 24


def check_method(name: str) -> str:
    """The method's registered name; an unknown one is an error listing the valid names."""
    key = name.strip().lower()
    if key not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return key


def method_passes(name: str) -> int:
    """The method's cost in passes over the weight (RTN: 1), a figure that does not vary by run."""
    key = check_method(name)
    return 1 if key == "rtn" else int(_MODULES[key].PASSES)


def _row_chunks(x: torch.Tensor) -> list[slice]:
    """Near-equal runs of rows, each at most one chunk: no 1-row remainder, which a compiled
    method would meet as a new shape (Dynamo specialises sizes of 1) and compile again for."""
    rows = x.shape[0]
    per_row = max(1, x[0].numel()) if rows else 1
    chunk = _CHUNK_ELEMENTS_CUDA if x.is_cuda else _CHUNK_ELEMENTS
    count = -(-rows // max(1, chunk // per_row))
    bounds = [rows * k // count for k in range(count + 1)] if count else []
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


def refine_scale(
    name: str, x: torch.Tensor, scale: torch.Tensor, grid: Grid, compiled: bool = False
) -> torch.Tensor:
    """x (rows, groups, size), any float dtype; RTN scale (rows, groups, 1) float32 -> refined scale.

    `compiled` runs the method's steps compiled (`quantizers.kernels`): several times faster, but
    sums taken in another order can tip a near-tie between two candidates the other way, so a
    caller decides it from the weight and its plan alone, as for the format kernels.
    """
    key = check_method(name)
    if key == "rtn":
        return scale
    module = _MODULES[key]
    parts = [module.scale_only(x[rows].float(), scale[rows], grid, compiled) for rows in _row_chunks(x)]
    return torch.cat(parts) if parts else scale


def refine_asymmetric(
    name: str, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `refine_scale`, for asymmetric int: (scale, integer zero point), both float32."""
    key = check_method(name)
    if key == "rtn":
        return scale, zero
    module = _MODULES[key]
    scales, zeros = [], []
    for rows in _row_chunks(x):
        s, z = module.asymmetric(x[rows].float(), scale[rows], zero[rows], grid, compiled)
        scales.append(s)
        zeros.append(z)
    if not scales:
        return scale, zero
    return torch.cat(scales), torch.cat(zeros)
