"""When to run a quantization kernel compiled, and how.

Eager torch on a 2-core CPU quantizes int4 at ~150 MiB/s; the same function compiled by
TorchInductor fuses the passes into one vectorised loop (GiB/s). Compiling costs seconds once per
process and dtype (shapes are dynamic, and Inductor's on-disk cache makes later processes cheap),
so it only pays on large tensors: below `COMPILE_MIN_ELEMENTS` the eager function runs. A plan
that compiles anyway (it holds a tensor that large) lowers the bar to `PLAN_COMPILE_MIN_ELEMENTS`
for all its tensors (`compile_floor_for`, set around a unit with `compile_floor`): the mid-sized
routed experts of MoE models (Qwen3-30B-A3B's 768x2048) then run compiled too, 3-5x faster than
eager, at no extra compile. The choice depends on the tensor and its plan alone, never on what
the process did before: compiled and eager kernels store the same bytes, but their error figures
(float sums in another order) differ in the last bits, and the manifest of a resumed run must
equal an uninterrupted one. The scale searches (`quantizers.methods`) compile their steps under
the same rule; for them a sum in another order can also tip a near-tie between two candidate
scales (W4A16 `search`: 2.5e-4 of the scales, same total error), so the rule keeps their bytes
reproducible too.

Every kernel is written in float32 with an explicit cast wherever eager torch would round to the
weight's dtype, and `emulate_precision_casts` keeps Inductor from dropping those casts, so the
compiled and eager paths give bit-identical results (a test holds them to that).
Set QUANTFLEET_COMPILE=0 to never compile, =1 to always compile.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

__all__ = [
    "COMPILE_MIN_ELEMENTS",
    "PLAN_COMPILE_MIN_ELEMENTS",
    "maybe_compiled",
    "compile_seconds",
    "compiles",
    "compile_floor",
    "compile_floor_for",
    "failed_kernels",
]

_log = logging.getLogger(__name__)

COMPILE_MIN_ELEMENTS = 1 << 22  # 4M elements: 8 MiB of bf16
# In a plan that compiles anyway. Smaller tensors save under 1 ms each compiled (W4A16 on 2 CPU
# cores: 256K elements 1.8 -> 1.0 ms, 1M 7.1 -> 3.3 ms), and odd small shapes (one group, one
# row) would make Dynamo compile again, for seconds.
PLAN_COMPILE_MIN_ELEMENTS = 1 << 20
_floor: ContextVar[int] = ContextVar("quantfleet_compile_floor", default=COMPILE_MIN_ELEMENTS)

F = TypeVar("F", bound=Callable[..., Any])

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
_broken: set[Callable[..., Any]] = set()
_compile_seconds: dict[str, float] = {}
_warned = False


def compile_seconds() -> dict[str, float]:
    """Wall time spent in first calls of compiled kernels, by kernel name (for reports)."""
    return dict(_compile_seconds)


def failed_kernels() -> tuple[str, ...]:
    """Names of the kernels whose compile failed in this process (they run eager from then on)."""
    return tuple(sorted(kernel.__name__ for kernel in _broken))


def _wants_compile(numel: int, force: bool | None) -> bool:
    if force is not None:
        return force
    setting = os.environ.get("QUANTFLEET_COMPILE", "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return numel >= _floor.get()


def compiles(numel: int, force: bool | None = None) -> bool:
    """Whether a tensor of `numel` elements runs the compiled kernels: `force` when given (a
    caller's `compile=` argument), else as QUANTFLEET_COMPILE and the current `compile_floor` say."""
    return _wants_compile(numel, force)


def compile_floor_for(numels: Iterable[int]) -> int:
    """The size from which the tensors of one plan (their element counts) run compiled: lowered
    to PLAN_COMPILE_MIN_ELEMENTS when one of them reaches COMPILE_MIN_ELEMENTS, so the workers
    compile the kernels anyway."""
    if any(numel >= COMPILE_MIN_ELEMENTS for numel in numels):
        return PLAN_COMPILE_MIN_ELEMENTS
    return COMPILE_MIN_ELEMENTS


@contextmanager
def compile_floor(elements: int) -> Iterator[None]:
    """Within the block, in this thread, tensors of at least `elements` run compiled."""
    token = _floor.set(elements)
    try:
        yield
    finally:
        _floor.reset(token)


def _report_fallback(name: str, exc: Exception) -> None:
    """One short line per process (a worker runs many units); the rest, and the trace, at debug."""
    global _warned
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if _warned:
        _log.debug("compiling %s failed too (%s); using eager torch", name, reason)
    else:
        _warned = True
        _log.warning("compiling %s failed (%s); using eager torch (slower; same bytes, but for a "
                     "searched scale where two candidates nearly tie)", name, reason)
    _log.debug("compile failure of %s", name, exc_info=exc)


def _detached(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The tensor arguments detached: same storage, but no longer views of another tensor.

    Dynamo guards a view argument's `_base` (its sizes, dtype and how they relate to the view's),
    so a kernel warmed on a fresh tensor compiled again for the first weight read from a file (a
    view of the flat byte buffer it was read or mapped into): seconds, in every worker's first
    unit. The kernels only read their arguments, so one compiled graph can serve both.
    """
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


# Graphs Dynamo keeps per kernel. A kernel compiles once per dtype, grid kind (a method's step:
# int, E4M3, E2M1) and size-1 dimension (per-channel groups): 5 for `search`'s step over the
# default mixed candidates in two dtypes. Past Dynamo's default of 8 it runs the function eagerly,
# without an error, and for a method that can change a near-tie's bytes depending on what the
# process compiled before; 64 keeps that out of reach.
RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    config.recompile_limit = max(int(config.recompile_limit), RECOMPILE_LIMIT)


def maybe_compiled(kernel: F, numel: int, force: bool | None = None) -> F:
    """`kernel` itself, or its compiled form when that is worth it (see module docstring).

    If compiling fails (no C++ compiler, an unsupported device), the eager kernel is used from then
    on and a warning says why: results are the same, only slower.
    """
    if kernel in _broken or not _wants_compile(numel, force):
        return kernel
    if kernel not in _compiled:
        _raise_recompile_limit()
        _compiled[kernel] = torch.compile(
            kernel, dynamic=True, options={"emulate_precision_casts": True}
        )
    compiled = _compiled[kernel]

    def run(*args: Any, **kwargs: Any) -> Any:
        first = kernel.__name__ not in _compile_seconds
        start = time.perf_counter()
        try:
            result = compiled(*_detached(args), **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            _broken.add(kernel)
            _report_fallback(kernel.__name__, exc)
            return kernel(*args, **kwargs)
        if first:
            _compile_seconds[kernel.__name__] = time.perf_counter() - start
        return result

    return run  # type: ignore[return-value]
