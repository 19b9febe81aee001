"""Byte counts as people read them, in binary units, for messages and reports."""

from __future__ import annotations

__all__ = ["format_size"]


def format_size(n: float) -> str:
    """`12 B`, `1.5 KiB` ... `3.2 TiB` (never a larger unit: a checkpoint stays in TiB)."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"
