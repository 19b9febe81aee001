"""Warm a worker process before its first unit: imports, device start-up and compiled kernels.

A fresh worker process pays, once, for importing torch and the project, for starting CUDA, and
for every kernel it compiles: Dynamo traces each kernel again in each process even when
Inductor's on-disk cache already holds the generated code (about 10 s for the int kernels on an
idle 2-core CPU, more under load). Paid inside the first unit, that time stalls the run after
Prefect and Ray have started. The driver instead starts Ray in the background and sends one
warm-up task per worker slot as soon as it knows the plan, so these costs overlap with Prefect's
start-up and planning.

Warming changes no result: compiled and eager kernels store the same bytes, and whether a tensor
uses the compiled one depends on that tensor and its plan alone (`quantizers.kernels`). Only the
kernels the plan will compile are warmed: a small model, whose tensors all stay eager, compiles
nothing.
"""

from __future__ import annotations

import time

import torch

from quantizers import quantize
from quantizers.kernels import COMPILE_MIN_ELEMENTS, compile_floor, compiles
from quantizers.scheme import QuantScheme

__all__ = ["warm_up", "WARM_SHAPE"]

# Rows a multiple of FP8_BLOCK's 128-row blocks, columns of every group size (16 to 128); neither
# 0 nor 1 in any dimension, so the dynamic-shape kernels compiled here serve every real shape.
# Every dimension differs from the others (rows, columns, groups at each group size, packed words):
# Dynamo gives equal sizes one symbol and guards that they stay equal, so a square shape would
# compile again for the first weight that is not. At least COMPILE_MIN_ELEMENTS, so the packing
# kernels, which decide by their own size, compile here too rather than in the first unit.
WARM_SHAPE = (1280, 3584)


def _device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def warm_up(schemes: tuple[QuantScheme, ...], largest: tuple[int, ...], device: str = "auto",
            floor: int | None = None, methods: tuple[str, ...] = ()) -> float:
    """Compile the kernels of each scheme whose largest tensor (elements, `largest[i]`) will be
    compiled, from `floor` elements on (the plan's `compile_floor_for`), with its method
    (`methods[i]`; none given: all RTN), whose steps compile too; returns the seconds it took.
    Imports and device start-up happen on the way."""
    started = time.perf_counter()
    target = _device(device)
    generator = torch.Generator().manual_seed(0)
    with compile_floor(floor or COMPILE_MIN_ELEMENTS):
        for scheme, numel, method in zip(schemes, largest, methods or ("rtn",) * len(schemes), strict=True):
            if not compiles(numel):
                continue
            weight = (torch.randn(WARM_SHAPE, generator=generator) * 0.02).to(torch.bfloat16).to(target)
            # Both variants of the codes kernel: the probes keep a tensor's dequantized weight
            # (or a sample's), the largest tensors and the measure pass do not.
            for keep in (True, False):
                quantize(weight, scheme, name="warm-up", compile=True, method=method, keep_dequantized=keep)
    return time.perf_counter() - started
