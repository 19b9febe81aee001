"""Byte counts as people read them, in binary units, for messages and reports."""

from __future__ import annotations

__all__ = ["format_size", "format_decimal_size"]


def format_size(n: float) -> str:
    """`12 B`, `1.5 KiB` ... `3.2 TiB` (never a larger unit: a checkpoint stays in TiB)."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def format_decimal_size(n: int) -> str:
    """`1 B`, `500 kB`, `53.52 MB` ... `1.2 TB`: sizes as users give them (`--target-size 120GB`)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} B"
