"""Errors a work unit raises; each names the unit, the tensor and the problem."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from infra.errors import AccessDenied, CredentialsRejected
from infra.sizes import format_size

__all__ = [
    "ConversionError", "CredentialsRefused", "DestinationUnwritable", "FailsEveryUnit", "OutOfSpace",
    "TensorQualityError", "UnitFailed", "credentials_refused", "out_of_space", "shared_failure",
]

# A full disk, or this user's quota on it spent: no later unit can write there either.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# A filesystem remounted read-only (ext4 does so on I/O errors), a permission taken away.
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


class ConversionError(Exception):
    """Base class of the workers layer's errors."""


class TensorQualityError(ConversionError):
    """A quantized tensor failed its quality gate (figures in the message)."""


class UnitFailed(ConversionError):
    """A work unit could not be converted; wraps the cause with the unit and tensor named."""


class FailsEveryUnit(UnitFailed):
    """A failure every unit after this one would meet too (the destination takes no more writes,
    the storage refuses the credentials), mostly after reading and quantizing its tensors: the
    driver starts no further unit. `reason` and `remedy` finish its line about those units."""

    reason = "the destination cannot be written"
    remedy = "make it writable"


class OutOfSpace(FailsEveryUnit):
    """The disk a unit writes its shard to is full."""

    reason = "the disk is full"
    remedy = "free some space"


class DestinationUnwritable(FailsEveryUnit):
    """The destination refuses writes: a read-only filesystem, a permission or a bucket policy
    withdrawn while the run went on."""


class CredentialsRefused(FailsEveryUnit):
    """Object storage refuses the credentials themselves (an STS or SSO session token that
    expired during a long run, a deleted key), for the source and the destination alike."""

    reason = "the storage refuses the credentials"
    remedy = "renew them (a session token expires after its set hours)"


def out_of_space(
    error: BaseException, unit: str, path: Path, in_temp_folder: bool = False
) -> OutOfSpace | None:
    """`error` (or what caused it) as an OutOfSpace naming `unit` and the folder of the file
    `path` it wrote, with what that filesystem has left; None when no full disk is behind it.
    `in_temp_folder`: `path` is a scratch file in the worker's temp folder (a shard bound for
    object storage), which TMPDIR moves."""
    seen = next((e for e in _chain(error) if isinstance(e, OSError) and e.errno in _NO_SPACE), None)
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


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:  # a chain can loop back on itself
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _within(filename: object, folders: list[Path]) -> bool:
    if not isinstance(filename, str | Path):
        return False
    path = Path(filename)
    return any(path == folder or folder in path.parents for folder in folders)


def credentials_refused(error: BaseException, unit: str) -> CredentialsRefused | None:
    """`error` as a CredentialsRefused naming `unit` when storage rejected the credentials behind
    it (an expired session token, a deleted key); None otherwise."""
    seen = next((e for e in _chain(error) if isinstance(e, CredentialsRejected)), None)
    return None if seen is None else CredentialsRefused(f"unit {unit}: {seen}")


def shared_failure(
    error: BaseException, unit: str, staging_uri: str, folders: list[Path]
) -> FailsEveryUnit | None:
    """`error` as the FailsEveryUnit it means, naming `unit`: credentials the storage rejects
    (CredentialsRefused), or a write refused under the staging storage (`staging_uri`) or one of
    the local `folders` the unit writes in, staging on local disk and the scratch folder
    (DestinationUnwritable). None for anything else, a source object or file that cannot be read
    included (other units may read theirs)."""
    refused = credentials_refused(error, unit)
    if refused is not None:
        return refused
    for cause in _chain(error):
        if isinstance(cause, OSError) and cause.errno in _NO_WRITE and _within(cause.filename, folders):
            return DestinationUnwritable(f"unit {unit}: {cause.strerror or cause} writing in "
                                         f"{Path(cause.filename).parent}")
        base = staging_uri.rstrip("/")
        if isinstance(cause, AccessDenied) and str(cause).startswith((f"{base}/", f"{base}:")):
            return DestinationUnwritable(f"unit {unit}: {cause}")
    return None
