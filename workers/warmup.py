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
from collections.abc import Iterable

import torch

from quantizers import quantize
from quantizers.kernels import COMPILE_MIN_ELEMENTS, compile_floor, compiles
from quantizers.scheme import QuantScheme
from workers.convert_unit import keeps_dequantized_weight
from workers.units import TensorJob

__all__ = ["warm_up", "kept_variants", "WARM_SHAPE"]

BOTH_VARIANTS = (True, False)

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


def kept_variants(jobs: Iterable[TensorJob], schemes: int, probes: int) -> tuple[tuple[bool, ...], ...]:
    """For each of `schemes` schemes, which variants of its codes kernel the jobs will run: the one
    that keeps the dequantized weight for the probes (True), the one that does not (False).

    Each variant is a kernel of its own, traced (and, on a GPU, loaded) in every worker process:
    0.1-0.3 s more per worker on a 2-core CPU for the second. Most plans need only the first:
    every weight of at most 16M elements or 1024 rows keeps its dequantized weight, and the
    weights that do not still probe a sample through the first.
    """
    kept: list[set[bool]] = [set() for _ in range(schemes)]
    for job in jobs:
        if job.scheme is None or job.passthrough:
            continue
        if probes > 0:
            kept[job.scheme].add(True)  # kept, or (NVFP4 partners, largest weights) a probed sample
        kept[job.scheme].add(keeps_dequantized_weight(job, probes))
    return tuple(tuple(sorted(variants, reverse=True)) for variants in kept)


def warm_up(schemes: tuple[QuantScheme, ...], largest: tuple[int, ...], device: str = "auto",
            floor: int | None = None, methods: tuple[str, ...] = (),
            variants: tuple[tuple[bool, ...], ...] = ()) -> float:
    """Compile the kernels of each scheme whose largest tensor (elements, `largest[i]`) will be
    compiled, from `floor` elements on (the plan's `compile_floor_for`), with its method
    (`methods[i]`; none given: all RTN), whose steps compile too, in the codes kernel's variants
    `variants[i]` (`kept_variants`; none given: both); returns the seconds it took. Imports and
    device start-up happen on the way."""
    started = time.perf_counter()
    target = _device(device)
    generator = torch.Generator().manual_seed(0)
    with compile_floor(floor or COMPILE_MIN_ELEMENTS):
        for scheme, numel, method, keeps in zip(schemes, largest, methods or ("rtn",) * len(schemes),
                                                variants or (BOTH_VARIANTS,) * len(schemes), strict=True):
            if not compiles(numel):
                continue
            weight = (torch.randn(WARM_SHAPE, generator=generator) * 0.02).to(torch.bfloat16).to(target)
            for keep in keeps:
                quantize(weight, scheme, name="warm-up", compile=True, method=method, keep_dequantized=keep)
    return time.perf_counter() - started
