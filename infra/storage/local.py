"""Local-folder backend: the embedded default, and what tests and single-node runs use.

Writes go to a hidden temporary file in the destination folder and are renamed into place, so a
reader never sees a partial object; `if_absent` uses os.link, which fails when the name is taken
(rename would silently replace it). The SHA-256 computed while writing is kept in a
`user.quantfleet.sha256` extended attribute when the filesystem supports it, with the file's size
and modification time: `stat` reports it only while both still match.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from infra.errors import AccessDenied, AlreadyExists, InvalidURI, ObjectNotFound, StorageError
from infra.storage.base import (
    ObjectInfo,
    ObjectWriter,
    Storage,
    WriteResult,
    check_key,
    check_prefix,
)

__all__ = ["TEMP_PREFIX", "LocalStorage", "nearest_existing"]

TEMP_PREFIX = ".qf-tmp-"
_XATTR = "user.quantfleet.sha256"


def _raise_os_error(exc: OSError, uri: str, what: str) -> NoReturn:
    if isinstance(exc, FileNotFoundError):
        raise ObjectNotFound(f"{uri}: not found ({what})") from exc
    if isinstance(exc, PermissionError):
        raise AccessDenied(f"{uri}: permission denied ({what})") from exc
    raise StorageError(f"{uri}: {what} failed: {exc.strerror or exc}") from exc


def nearest_existing(path: Path) -> Path:
    """`path`, or before it exists its nearest existing parent: where it would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _get_sha256(path: Path, st: os.stat_result) -> str | None:
    """The SHA-256 recorded when the file was written, if the file is still as it was then.

    The digest is stored with the file's size and modification time (`st`'s), so a file written
    in place afterwards (by another tool: ours only ever replace files) has its bytes hashed
    again rather than trusted: a staged shard edited after staging is then redone, not published
    under the digest of what it held before."""
    try:
        value = os.getxattr(path, _XATTR).decode("ascii")
    except (OSError, AttributeError, UnicodeDecodeError):
        return None  # no xattr support, or a file written by another tool
    sha256, _, stamp = value.partition(" ")
    return sha256 if stamp == _stamp(st) else None


def _set_sha256(path: str, sha256: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.setxattr(path, _XATTR, f"{sha256} {_stamp(os.stat(path))}".encode("ascii"))


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def _etag(st: os.stat_result) -> str:
    # Changes whenever the file is replaced; good enough to detect "not the file I staged".
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalStorage(Storage):
    """Objects are files under `root`; keys are their '/'-separated relative paths."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        """Opening creates nothing: the folder is made by the first write under it. (A mistyped
        source path left an empty folder behind every command that read it.)"""
        self.root = Path(root).resolve()
        self.fsync = fsync
        if self.root.exists() and not self.root.is_dir():
            raise InvalidURI(f"{self.uri()}: a file, not a folder; name the folder that holds it "
                             f"({self.root.parent})")

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def uri(self, key: str = "") -> str:
        return f"file://{self.root / key}" if key else f"file://{self.root}"

    def path(self, key: str) -> Path:
        """The filesystem path of `key` (after checking that the key stays inside the root)."""
        return self.root / check_key(key)

    # --- reading -----------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue  # an unfinished write, not an object
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = full.stat()
                    found.append(ObjectInfo(key=key, size=st.st_size, etag=_etag(st)))
        yield from sorted(found, key=lambda info: info.key)

    def stat(self, key: str) -> ObjectInfo:
        path = self.path(key)
        try:
            st = path.stat()
        except OSError as exc:
            _raise_os_error(exc, self.uri(key), "stat")
        if not path.is_file():
            raise ObjectNotFound(f"{self.uri(key)}: not a file")
        return ObjectInfo(key=key, size=st.st_size, etag=_etag(st), sha256=_get_sha256(path, st))

    def _open_for_reading(self, key: str) -> int:
        try:
            return os.open(self.path(key), os.O_RDONLY)
        except OSError as exc:
            _raise_os_error(exc, self.uri(key), "open")

    def _short_read(self, key: str, wanted: int, offset: int, ends: int) -> StorageError:
        return StorageError(
            f"{self.uri(key)}: short read: wanted {wanted} bytes at offset {offset}, "
            f"the file ends after {ends}"
        )

    def read_range_into(self, key: str, offset: int, buffer: memoryview) -> None:
        fd = self._open_for_reading(key)
        try:
            self._pread_exact(fd, offset, buffer.cast("B"), key)
        finally:
            os.close(fd)

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def free_bytes(self) -> int | None:
        """What the filesystem holding the root (or, before it exists, its nearest existing
        parent) leaves this user: blocks reserved for root are not counted. None when the
        filesystem reports no size at all (some FUSE and network mounts), so nothing is known."""
        usage = shutil.disk_usage(nearest_existing(self.root))
        return None if usage.total == 0 else usage.free

    def map_range(self, key: str, offset: int, length: int) -> memoryview | None:
        # A private (copy-on-write) map: the bytes are the page cache's own, so reading a tensor
        # costs no copy and no fresh memory, and a kernel that wrote to its input could not
        # change the source file. Madvised WILLNEED so the kernel starts reading a cold file now.
        if length <= 0:
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        fd = self._open_for_reading(key)
        try:
            size = os.fstat(fd).st_size
            if offset + length > size:
                raise self._short_read(key, length, offset, size)
            mapped = mmap.mmap(fd, offset + length - start, offset=start, access=mmap.ACCESS_COPY)
        except OSError as exc:
            _raise_os_error(exc, self.uri(key), "map")
        finally:
            os.close(fd)  # the map keeps its own reference to the file
        mapped.madvise(mmap.MADV_WILLNEED)
        return memoryview(mapped)[offset - start :]

    def _pread_exact(self, fd: int, offset: int, view: memoryview, key: str) -> None:
        # preadv fills the caller's buffer directly (no temporary bytes object); loop because a
        # single call may return fewer bytes than asked for.
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                _raise_os_error(exc, self.uri(key), "read")
            if n == 0:
                raise self._short_read(key, len(view), offset, offset + done)
            done += n

    # --- writing -----------------------------------------------------------------------

    def open_writer(self, key: str, *, size_hint: int | None = None, if_absent: bool = False) -> ObjectWriter:
        return _LocalWriter(self, key, if_absent=if_absent)

    def _temp_path(self, final: Path) -> Path:
        return final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{final.name}")

    def _publish_temp(self, tmp: Path, final: Path, key: str, if_absent: bool) -> None:
        """Move a finished temp file to its final name, atomically."""
        try:
            if if_absent:
                try:
                    os.link(tmp, final)  # fails with EEXIST instead of replacing
                except FileExistsError as exc:
                    raise AlreadyExists(f"{self.uri(key)}: already exists; refusing to overwrite") from exc
                os.unlink(tmp)
            else:
                os.replace(tmp, final)
            if self.fsync:
                self._fsync_dir(final.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def scratch_path(self, key: str) -> Path | None:
        """A temp file name beside `key` (same filesystem) for a writer that needs random access;
        hand the finished file to `adopt`. Listings skip it; `abort_stale_uploads` removes it."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        return self._temp_path(final)

    def adopt(
        self, key: str, scratch: Path, *, sha256: str | None = None, chunk_bytes: int = 16 << 20
    ) -> WriteResult:
        """Make the finished file at `scratch` (from `scratch_path`) the object `key`, atomically.

        Without `sha256` (the writer's own digest of what it wrote), hashes it on the way (one
        sequential read, usually from the page cache) instead of the copy an upload would make.
        """
        digest = hashlib.sha256()
        with open(scratch, "rb", buffering=0) as handle:
            while sha256 is None and (chunk := handle.read(chunk_bytes)):
                digest.update(chunk)
            if self.fsync:
                os.fsync(handle.fileno())
        sha256 = sha256 or digest.hexdigest()
        _set_sha256(str(scratch), sha256)
        final = self.path(key)
        self._publish_temp(scratch, final, key, if_absent=False)
        st = final.stat()
        return WriteResult(key=key, uri=self.uri(key), size=st.st_size, sha256=sha256, etag=_etag(st))

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def copy(self, src_key: str, dst_key: str, *, if_absent: bool = False) -> ObjectInfo:
        src, dst = self.path(src_key), self.path(dst_key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri(src_key)}: not found (copy source)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_path(dst)
        try:
            # A hard link is an O(1) copy of a 50 GB shard; safe because objects are never
            # modified in place (every write replaces the file via rename).
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                _raise_os_error(exc, self.uri(src_key), "copy")
            shutil.copyfile(src, tmp)
            sha = _get_sha256(src, src.stat())
            if sha:
                _set_sha256(str(tmp), sha)
        self._publish_temp(tmp, dst, dst_key, if_absent)
        return self.stat(dst_key)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            _raise_os_error(exc, self.uri(key), "delete")

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        self._prune_empty_dirs(prefix)
        return count

    def _prune_empty_dirs(self, prefix: str) -> None:
        base = self.root / prefix.rstrip("/") if prefix.strip("/") else self.root
        if base.is_dir():
            for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda t: -len(t[0])):
                with contextlib.suppress(OSError):
                    if Path(dirpath) != self.root:
                        os.rmdir(dirpath)  # only succeeds when empty
        # Folders the deleted objects leave empty above the prefix go too (e.g. `.staging/` once
        # its last run is gone), as they do on S3, where a prefix without objects does not exist.
        for folder in base.parents if base != self.root else ():
            if folder == self.root or self.root not in folder.parents:
                break
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (or already gone): nothing above it can be empty either

    def abort_stale_uploads(self, prefix: str = "", *, older_than_s: float = 0.0) -> int:
        check_prefix(prefix)
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for dirpath, _dirs, filenames in os.walk(start):
            for name in filenames:
                full = Path(dirpath) / name
                final_key = (Path(dirpath) / name.split("-", 3)[-1]).relative_to(self.root)
                if not name.startswith(TEMP_PREFIX) or not final_key.as_posix().startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if full.stat().st_mtime <= cutoff:
                        full.unlink()
                        removed += 1
        return removed


class _LocalWriter(ObjectWriter):
    def __init__(self, storage: LocalStorage, key: str, *, if_absent: bool) -> None:
        super().__init__()
        self._storage = storage
        self._key = key
        self._final = storage.path(key)
        self._if_absent = if_absent
        self._final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = storage._temp_path(self._final)
        try:
            self._file = open(self._tmp, "xb", buffering=0)  # noqa: SIM115 - closed in finish
        except OSError as exc:
            _raise_os_error(exc, storage.uri(key), "create")

    def _write(self, view: memoryview) -> None:
        done = 0
        while done < len(view):  # unbuffered writes may be partial
            try:
                n = self._file.write(view[done:])
            except OSError as exc:
                _raise_os_error(exc, self._storage.uri(self._key), "write")
            done += n or 0

    def _finish(self, sha256: str) -> WriteResult:
        if self._storage.fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        _set_sha256(str(self._tmp), sha256)
        self._storage._publish_temp(self._tmp, self._final, self._key, self._if_absent)
        st = self._final.stat()
        return WriteResult(
            key=self._key,
            uri=self._storage.uri(self._key),
            size=self._size,
            sha256=sha256,
            etag=_etag(st),
        )

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)
