"""Errors a work unit raises; each names the unit, the tensor and the problem."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from infra.sizes import format_size

__all__ = ["ConversionError", "OutOfSpace", "TensorQualityError", "UnitFailed", "out_of_space"]

# A full disk, or this user's quota on it spent: no later unit can write there either.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class ConversionError(Exception):
    """Base class of the workers layer's errors."""


class TensorQualityError(ConversionError):
    """A quantized tensor failed its quality gate (figures in the message)."""


class UnitFailed(ConversionError):
    """A work unit could not be converted; wraps the cause with the unit and tensor named."""


class OutOfSpace(UnitFailed):
    """The disk a unit writes its shard to is full: the driver starts no further unit."""


def out_of_space(
    error: BaseException, unit: str, path: Path, in_temp_folder: bool = False
) -> OutOfSpace | None:
    """`error` (or what caused it) as an OutOfSpace naming `unit` and the folder of the file
    `path` it wrote, with what that filesystem has left; None when no full disk is behind it.
    `in_temp_folder`: `path` is a scratch file in the worker's temp folder (a shard bound for
    object storage), which TMPDIR moves."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:  # a chain can loop back on itself
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    seen = next((e for e in chain if isinstance(e, OSError) and e.errno in _NO_SPACE), None)
    if seen is None:
        return None
    try:
        free = f"{format_size(shutil.disk_usage(path.parent).free)} free there"
    except OSError:
        free = "free space unknown"
    what = "no space left on device" if seen.errno == errno.ENOSPC else "disk quota exceeded"
    hint = ("; shards bound for object storage are assembled there, one per running unit: point "
            "TMPDIR at a larger disk on the workers") if in_temp_folder else ""
    return OutOfSpace(f"unit {unit}: {what} writing in {path.parent} ({free}){hint}")
