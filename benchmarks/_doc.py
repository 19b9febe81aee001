"""Record benchmark figures: replace one `## section` of docs/benchmarks.md, keep the others; and
the measuring helpers the benchmarks share (best-of timing, RSS)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["DOC", "best_seconds", "machine_line", "update_section", "peak_rss_bytes", "reset_peak_rss"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine_line() -> str:
    return (f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def best_seconds(fn: Callable[[], object], reps: int = 5) -> float:
    """The fastest of `reps` timed calls of `fn`: the one least disturbed by other work."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def update_section(title: str, body: str) -> None:
    """Replace (or append) the section headed `## {title}` with `body`."""
    heading = f"## {title}"
    section = f"{heading}\n\n{body.strip()}\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end:] if end != -1 else "")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Make the kernel's peak-RSS counter (VmHWM) start again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    return _status("VmHWM")


def rss_bytes() -> int:
    return _status("VmRSS")
