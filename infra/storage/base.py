"""The storage interface every backend implements, and the records it returns.

Keys are '/'-separated paths relative to the storage root (a local folder or an S3 bucket+prefix).
A key never starts with '/' and never contains '..' segments; backends refuse such keys.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import InvalidURI

__all__ = [
    "ObjectInfo",
    "ObjectWriter",
    "Storage",
    "WriteResult",
    "check_key",
    "check_prefix",
    "join_key",
]


class ObjectInfo(BaseModel):
    """What a listing or a stat knows about one object.

    `sha256` is the hex SHA-256 recorded when quantfleet wrote the object (S3 metadata
    `x-amz-meta-sha256`, a local extended attribute); None when unknown, e.g. in listings or for
    objects written by other tools.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    size: int = Field(ge=0)
    etag: str | None = None
    sha256: str | None = None


class WriteResult(BaseModel):
    """The outcome of a finished write: what a caller records to verify the object later."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    uri: str
    size: int = Field(ge=0)
    sha256: str
    etag: str | None = None


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Return `key` if it is a safe relative key, else raise InvalidURI.

    Refusing '..' and absolute keys keeps every backend inside its root, whatever a manifest says.
    """
    if key == "" and allow_empty:
        return key
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts[:-1])
        or (parts[-1] in (".", ".."))
    ):
        raise InvalidURI(f"invalid storage key {key!r}: keys are relative '/'-separated paths")
    if "\x00" in key:
        raise InvalidURI(f"invalid storage key {key!r}: NUL byte")
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` (a key prefix, may be empty or end with '/') if it stays inside the root."""
    if prefix.startswith("/") or any(p in (".", "..") for p in prefix.split("/")):
        raise InvalidURI(f"invalid storage prefix {prefix!r}: prefixes are relative paths")
    return prefix


def join_key(*parts: str) -> str:
    """Join key fragments with '/', ignoring empty fragments and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class ObjectWriter(abc.ABC):
    """A streaming write of one object.

    The object becomes visible only at `close()`; `abort()` (called by `__exit__` when an
    exception is in flight) discards everything, so a failed write never leaves a partial object.
    SHA-256 is computed here, over the exact bytes handed to `write()`.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False

    @property
    def bytes_written(self) -> int:
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append `data`; returns the number of bytes taken (all of them)."""
        if self._done:
            raise ValueError("write() on a closed or aborted writer")
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._size += len(view)
        self._write(view)
        return len(view)

    def close(self) -> WriteResult:
        """Finish the object and make it visible; returns its size and SHA-256."""
        if self._done:
            raise ValueError("close() on a closed or aborted writer")
        self._done = True
        try:
            return self._finish(self._hash.hexdigest())
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Discard everything written so far; safe to call more than once."""
        if not self._done:
            self._done = True
            self._discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Never finalise while an exception is in flight: a half-written shard must not appear.
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.close()

    @abc.abstractmethod
    def _write(self, view: memoryview) -> None: ...

    @abc.abstractmethod
    def _finish(self, sha256: str) -> WriteResult: ...

    @abc.abstractmethod
    def _discard(self) -> None: ...


class Storage(abc.ABC):
    """A flat key space of immutable-once-published objects (a folder or an S3 prefix)."""

    @abc.abstractmethod
    def uri(self, key: str = "") -> str:
        """The full URI of `key`, used in every error message."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix` (recursively), in key order."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, ETag and recorded SHA-256 of one object; ObjectNotFound if absent."""

    def exists(self, key: str) -> bool:
        from infra.errors import ObjectNotFound

        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abc.abstractmethod
    def read_range_into(self, key: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` (writable, byte-addressed) with the object's bytes from `offset`.

        Lets a caller read straight into a tensor's memory with no intermediate copy.
        """

    def local_path(self, key: str) -> Path | None:
        """The object's file on this machine, when it is one (local disk), else None: lets a
        writer copy its bytes file to file in the kernel."""
        return None

    def free_bytes(self) -> int | None:
        """Bytes this process may still write under the storage's root, when the backend has such
        a limit (a local filesystem), else None (object storage)."""
        return None

    def map_range(self, key: str, offset: int, length: int) -> memoryview | None:
        """The object's bytes [offset, offset + length) mapped into memory, or None when this
        backend cannot map them (only local files can). The view is copy-on-write: writing to it
        never changes the object. The mapping lasts as long as the view (or a tensor made from it)."""
        return None

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes of the object from `offset`."""
        buf = bytearray(length)
        self.read_range_into(key, offset, memoryview(buf))
        return bytes(buf)

    def read_bytes(self, key: str) -> bytes:
        """The whole object (for small side files and headers)."""
        return self.read_range(key, 0, self.stat(key).size)

    @abc.abstractmethod
    def open_writer(self, key: str, *, size_hint: int | None = None, if_absent: bool = False) -> ObjectWriter:
        """A streaming writer for `key`.

        `size_hint` (expected total bytes) lets S3 choose a part size that fits 10,000 parts.
        `if_absent=True` makes the final step conditional: AlreadyExists if the key is taken.
        """

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> WriteResult:
        """Write a small object in one go."""
        with self.open_writer(key, size_hint=len(data), if_absent=if_absent) as w:
            w.write(data)
            result = w.close()
        return result

    @abc.abstractmethod
    def copy(self, src_key: str, dst_key: str, *, if_absent: bool = False) -> ObjectInfo:
        """Copy an object inside this storage, keeping its recorded SHA-256."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting an absent object is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many were deleted."""
        count = 0
        for info in list(self.list(prefix)):
            self.delete(info.key)
            count += 1
        return count

    @abc.abstractmethod
    def abort_stale_uploads(self, prefix: str = "", *, older_than_s: float = 0.0) -> int:
        """Discard unfinished writes under `prefix` left by a killed process.

        Only uploads started more than `older_than_s` seconds ago are touched, so a live writer
        elsewhere in the fleet can be protected. Returns how many were discarded.
        """

    def scratch_path(self, key: str) -> Path | None:
        """A local file beside `key` that `adopt` can turn into the object, or None when this
        backend has no such fast path (writers then stream the bytes with `open_writer`)."""
        return None

    def adopt(self, key: str, scratch: Path, *, sha256: str | None = None) -> WriteResult:
        """Make the finished local file `scratch` the object `key`; `sha256`, when the writer
        computed it while writing, spares hashing the file again."""
        raise NotImplementedError(f"{type(self).__name__} cannot adopt local files")

    def hash_object(self, key: str, *, chunk_bytes: int = 8 << 20,
                    on_bytes: Callable[[int], None] | None = None) -> str:
        """Re-read the whole object and return its hex SHA-256 (end-to-end verification);
        `on_bytes(n)` is called as each chunk of n bytes is hashed (progress)."""
        size = self.stat(key).size
        digest = hashlib.sha256()
        buf = bytearray(min(chunk_bytes, max(size, 1)))
        offset = 0
        while offset < size:
            n = min(len(buf), size - offset)
            view = memoryview(buf)[:n]
            self.read_range_into(key, offset, view)
            digest.update(view)
            offset += n
            if on_bytes is not None:
                on_bytes(n)
        return digest.hexdigest()
