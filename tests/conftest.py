"""Suite-wide settings: GPU tests skip, with the reason, where no CUDA device exists; the Ray and
the compile workers that tests leave running stop before the interpreter's exit."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU; run on a GPU machine (benchmarks/gpu_check.py checks the same and "
        "measures throughput)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop what the conversions left running while pytest's fault handler still reports.

    Tests that convert leave the last local Ray connected and Inductor's compile workers alive
    (`quantfleet convert` stops its Ray with the same `stop_ray` before it exits); otherwise both
    are torn down by exit handlers, after pytest has switched its fault handler off. One
    clean-clone run of the suite passed every test and then died of SIGSEGV at exit with no
    trace, so they are stopped here, in order, where a crash would print one (scripts/test.sh
    also sets PYTHONFAULTHANDLER).
    """
    import sys

    if "ray" in sys.modules:
        from flows.execute import stop_ray

        stop_ray()
    if "torch._inductor.async_compile" in sys.modules:
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
