"""Byte counts as people read them, in binary units, for messages and reports."""

from __future__ import annotations

import math
import re

__all__ = ["format_size", "format_decimal_size", "parse_size"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_EXAMPLES = "(examples: 5GB, 500MiB, 2e9)"


def parse_size(text: str | int | float) -> int:
    """'120GB', '500MiB', '5e9', 5e9 -> bytes (decimal and binary units, any case); anything else,
    or less than one byte, is a ValueError saying what is expected."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r} {_EXAMPLES}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"not a size: {text!r} {_EXAMPLES}")
        value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"size must be a positive, finite number of bytes: {text!r}")
    return int(value)


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
