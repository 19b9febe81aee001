"""Byte counts as people read them, in binary units, for messages and reports."""

from __future__ import annotations

__all__ = ["format_size"]


def format_size(n: float) -> str:
    """`12 B`, `1.5 KiB` ... `3.2 TiB` (never a larger unit: a checkpoint stays in TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
