"""The pipelined inner loop of a work unit: read ahead, transform, write and hash, all at once.

Profiling one unit (docs/benchmarks.md, "Where one unit's time goes") showed the stages of a unit
run one after another, one tensor at a time: read, copy to the device, quantize, copy back,
pwrite, then a second pass over the finished file for its SHA-256. Here each stage has its own
thread, so they overlap:

- `Prefetcher` reads the next source tensors in a thread while the current one is transformed,
  bounded by a byte budget (a small multiple of the largest tensor stays the peak). On CUDA it
  reads into pinned memory and starts the host-to-device copy on a side stream; the consumer's
  stream waits on an event, so kernels never see a half-copied tensor.
- `ShardSink` takes the transform's output parts, copies them back (CUDA: a side stream into
  pinned memory) and pwrites them in a writer thread, bounded by bytes queued, starting the
  kernel's writeback as it goes so the final fsync has little left. A hasher thread hashes the
  shard in file order as parts are written (`_OrderedHash`): a part at the hash frontier is hashed from
  memory, parts ahead of it are held by reference up to a budget. The layout (dtype regions, then
  names) puts every job's small parts (shapes, scales) in regions before or after the big ones,
  so some of the file can only be hashed once the last job is done; that part is read back from
  the page cache -- still one pass over the file in all, never two.

hashlib, pwrite, preadv and torch kernels all release the GIL, so the threads run in parallel.
The per-tensor transform itself (`workers.convert_unit._convert_job`) is passed in and knows
nothing of the threads: it reads a tensor from a reader-like object and hands parts to the sink.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from infra.safetensors import TensorInfo, TensorReader
from workers.errors import UnitFailed
from workers.units import TensorJob

__all__ = ["Prefetcher", "ShardSink", "run_pipelined"]

# Writeback is started (not waited for) every this many bytes, so the fsync before the shard is
# staged has little left to do.
_WRITEBACK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>
# Host parts go to the writer in pieces of at most this many bytes.
_PIECE_BYTES = 32 << 20
# copy_file_range errors that mean "not between these files": pwrite instead.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})
_SENTINEL = object()


@cache
def _sync_file_range() -> Callable[..., int] | None:
    """Linux's sync_file_range(2) from libc (Python's os module has no binding), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting, so the fsync before the
    shard is staged has little left to do and the page cache never holds a whole dirty shard."""
    function = _sync_file_range()
    if function is not None:
        function(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a failure only leaves the work to fsync


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


@dataclass(slots=True)
class _Budget:
    """Bytes a stage may hold; one item larger than the whole budget still passes when alone."""

    limit: int
    used: int = 0
    closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def acquire(self, n: int) -> bool:
        with self.cond:
            while not self.closed and self.used > 0 and self.used + n > self.limit:
                self.cond.wait()
            if self.closed:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


@dataclass(slots=True)
class _Fetched:
    tensor: torch.Tensor
    nbytes: int
    ready: Any = None  # a CUDA event recorded after the host-to-device copy, or None


class Prefetcher:
    """Reads `jobs` in order in a background thread; `read` hands them out, in the same order.

    Duck-types `TensorReader.read(key, info)` for the transform. Tensors of jobs with a scheme are
    delivered on `device` (copied there on a side stream); pass-through tensors stay on the CPU,
    where they are written from.
    """

    def __init__(
        self, reader: TensorReader, jobs: Sequence[TensorJob], device: torch.device, *, budget_bytes: int,
        direct: TensorReader | None = None,
    ) -> None:
        self._reader = reader
        # With a `direct` reader, only plain jobs are read ahead: a quantized source's parts (weight,
        # scales) and NVFP4 partners are read by the transform itself, through `direct`, on its thread.
        self._direct = direct
        self._jobs = [job for job in jobs if direct is None or job.source is None]
        self._device = device
        self._budget = _Budget(budget_bytes)
        self._ready: queue.Queue[_Fetched | BaseException] = queue.Queue()
        self._next = 0
        self._held = 0
        self._stream = torch.cuda.Stream(device) if _is_cuda(device) else None
        self._thread = threading.Thread(target=self._run, name="qf-prefetch", daemon=True)
        self._thread.start()

    def _fetch(self, job: TensorJob) -> _Fetched:
        info = TensorInfo(name=job.name, dtype=job.dtype, shape=job.shape, begin=job.begin, end=job.end)
        nbytes = job.end - job.begin
        if self._stream is None or job.scheme is None:
            return _Fetched(self._reader.read(job.file, info), nbytes)
        host = self._reader.read(job.file, info, pin_memory=True)
        with torch.cuda.stream(self._stream):
            on_device = host.to(self._device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        # The pinned host block is kept until the copy is done by torch's caching host allocator.
        return _Fetched(on_device, nbytes, ready)

    def _run(self) -> None:
        for job in self._jobs:
            if not self._budget.acquire(job.end - job.begin):
                return
            try:
                self._ready.put(self._fetch(job))
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, who raises it
                self._ready.put(error)
                return

    def read(self, key: str, info: TensorInfo) -> torch.Tensor:
        """The next tensor; `key` and `info` must name the next job (the transform's own read)."""
        if self._held:
            self._budget.release(self._held)  # the previous tensor is the transform's, not ours
            self._held = 0
        expected = self._jobs[self._next] if self._next < len(self._jobs) or self._direct is None else None
        if self._direct is not None and (
            expected is None or (key, info.name, info.begin) != (expected.file, expected.name, expected.begin)
        ):
            return self._direct.read(key, info)
        assert expected is not None
        if (key, info.name, info.begin) != (expected.file, expected.name, expected.begin):
            raise UnitFailed(
                f"pipeline out of order: asked for {info.name} of {key}, next is {expected.name}"
            )
        self._next += 1
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        self._held = item.nbytes
        if item.ready is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(item.ready)
            # Allocated on the side stream, used on this one: keep the allocator from reusing it early.
            item.tensor.record_stream(current)
        return item.tensor

    def close(self) -> None:
        self._budget.close()  # the thread blocks only on the budget; the queue is unbounded
        self._thread.join()


class _OrderedHash:
    """SHA-256 of a file written at arbitrary offsets, fed in file order as a frontier advances.

    A part written at the frontier is hashed from memory. A part ahead of it is held by reference
    while the hold budget allows, else only noted as written and read back from the file (page
    cache) when the frontier reaches it. The shard layout puts small parts (shapes, scales) of
    every job in regions of their own, so the frontier often waits for the last job; what was held
    is then hashed without touching the file.
    """

    def __init__(self, fd: int, size: int, hold_limit: int, chunk_bytes: int = 16 << 20) -> None:
        self.digest = hashlib.sha256()
        self.frontier = 0
        self.size = size
        self.read_back = 0  # bytes hashed from the file rather than from memory, for reports
        self._fd = fd
        self._held: dict[int, memoryview] = {}
        self._written: dict[int, int] = {}  # offset -> length, written ahead of the frontier
        self._held_bytes = 0
        self._hold_limit = hold_limit
        self._chunk = chunk_bytes

    def feed(self, offset: int, view: memoryview) -> None:
        if offset != self.frontier:
            if self._held_bytes + len(view) <= self._hold_limit:
                self._held[offset] = view
                self._held_bytes += len(view)
            else:
                self._written[offset] = len(view)
            return
        self.digest.update(view)
        self.frontier += len(view)
        self._advance()

    def _advance(self) -> None:
        while True:
            held = self._held.pop(self.frontier, None)
            if held is not None:
                self._held_bytes -= len(held)
                self.digest.update(held)
                self.frontier += len(held)
                continue
            length = self._written.pop(self.frontier, None)
            if length is None:
                return
            self._hash_file(self.frontier + length)

    def _hash_file(self, stop: int) -> None:
        while self.frontier < stop:
            chunk = os.pread(self._fd, min(self._chunk, stop - self.frontier), self.frontier)
            if not chunk:
                raise UnitFailed(f"scratch file ended at {self.frontier} of {self.size} bytes")
            self.digest.update(chunk)
            self.read_back += len(chunk)
            self.frontier += len(chunk)

    def finish(self) -> str:
        self._advance()
        if self.frontier != self.size or self._held or self._written:
            raise UnitFailed(f"shard bytes not all written: hashed {self.frontier} of {self.size}")
        return self.digest.hexdigest()


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")


@dataclass(slots=True)
class _Part:
    """Bytes for `offset`: a host view, or a device tensor once `ready` (a CUDA event) fires;
    `origin` names the local file and offset the host view's bytes were mapped from."""

    data: Any
    offset: int
    ready: Any = None
    origin: tuple[Path, int] | None = None


class ShardSink:
    """Writes output parts at their offsets from a writer thread and hashes the file in order."""

    def __init__(
        self, fd: int, size: int, device: torch.device, *, budget_bytes: int, hold_bytes: int
    ) -> None:
        self._fd = fd
        self._hash = _OrderedHash(fd, size, hold_bytes)
        self._budget = _Budget(budget_bytes)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._written: queue.Queue[Any] = queue.Queue()  # parts written, in order, to be hashed
        self._error: BaseException | None = None
        self._device = device
        self._stream = torch.cuda.Stream(device) if _is_cuda(device) else None
        self._unsynced = 0
        self._sources: dict[Path, int] = {}  # origin files open for copy_file_range
        self._copy_range_works = True
        # Writing and hashing each take about as long as the other (pwrite into the page cache
        # ~1-2 GB/s, SHA-256 ~1.7 GB/s on one core), so each has its own thread.
        self._thread = threading.Thread(target=self._run, name="qf-write", daemon=True)
        self._hasher = threading.Thread(target=self._run_hash, name="qf-hash", daemon=True)
        self._thread.start()
        self._hasher.start()

    def write_bytes(self, data: bytes | memoryview, offset: int) -> int:
        """Write raw bytes (the header) at `offset`, through the same ordered queue."""
        view = memoryview(data).cast("B")
        self._submit(_Part(view, offset), len(view))
        return len(view)

    def put(self, tensor: torch.Tensor, offset: int, origin: tuple[Path, int] | None = None) -> int:
        """Queue `tensor`'s bytes for `offset`; returns their count. Raises a writer failure.

        `origin` (a local file, and the offset in it where exactly these bytes are) lets the writer
        copy them file to file inside the kernel (copy_file_range: 2-3x faster than pwrite here);
        the hash still reads them from `tensor`, the same bytes.
        """
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu":
            view = _host_bytes(tensor)
            # In pieces, so the hasher works on one piece while the writer writes the next.
            for start in range(0, max(nbytes, 1), _PIECE_BYTES):
                piece = view[start : start + _PIECE_BYTES]
                at = None if origin is None else (origin[0], origin[1] + start)
                self._submit(_Part(piece, offset + start, origin=at), len(piece))
            return nbytes
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tensor.device))
        self._submit(_Part(flat, offset, ready=ready), nbytes)
        return nbytes

    def _submit(self, item: _Part, nbytes: int) -> None:
        if self._error is not None:
            raise UnitFailed(f"writing the shard failed: {self._error}") from self._error
        self._budget.acquire(nbytes)
        self._queue.put((item, nbytes))

    def _to_host(self, flat: torch.Tensor, ready: Any) -> memoryview:
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
            host.copy_(flat, non_blocking=True)
        self._stream.synchronize()  # only this thread waits; the kernels go on
        return host.numpy().data.cast("B")

    def _copy(self, origin: tuple[Path, int], view: memoryview, offset: int) -> None:
        """Copy `view`'s bytes from their origin file in the kernel; pwrite them where it can't."""
        path, source_offset = origin
        done = 0
        if self._copy_range_works:
            try:
                fd = self._sources.get(path)
                if fd is None:
                    fd = self._sources[path] = os.open(path, os.O_RDONLY)
                while done < len(view):
                    n = os.copy_file_range(
                        fd, self._fd, len(view) - done, source_offset + done, offset + done
                    )
                    if n == 0:
                        raise UnitFailed(f"{path}: ended at {source_offset + done} while copying a tensor")
                    done += n
                self._count_unsynced(len(view))
                return
            except OSError as error:
                if error.errno not in _NO_COPY_RANGE or done:
                    raise
                self._copy_range_works = False  # another filesystem, or an old kernel
        self._write(view, offset)

    def _count_unsynced(self, nbytes: int) -> None:
        self._unsynced += nbytes
        if self._unsynced >= _WRITEBACK_BYTES:
            _start_writeback(self._fd)
            self._unsynced = 0

    def _write(self, view: memoryview, offset: int) -> None:
        start = offset
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        self._count_unsynced(offset - start)

    def _run(self) -> None:
        while (entry := self._queue.get()) is not _SENTINEL:
            part, nbytes = entry
            offset, view = part.offset, None
            try:
                if self._error is None:
                    view = part.data if part.ready is None else self._to_host(part.data, part.ready)
                    if part.origin is not None:
                        self._copy(part.origin, view, offset)
                    else:
                        self._write(view, offset)
            except BaseException as error:  # noqa: BLE001 - reported by the next put or finish
                self._error = error
                view = None
            # Only bytes already in the file go to the hasher: it may read them back from there.
            self._written.put((view, offset, nbytes))
        self._written.put(_SENTINEL)

    def _run_hash(self) -> None:
        while (entry := self._written.get()) is not _SENTINEL:
            view, offset, nbytes = entry
            try:
                if view is not None and self._error is None:
                    self._hash.feed(offset, view)
            except BaseException as error:  # noqa: BLE001 - reported by the next put or finish
                self._error = error
            finally:
                self._budget.release(nbytes)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_SENTINEL)
            self._thread.join()
        self._hasher.join()
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()

    def finish(self) -> str:
        """Wait for every write; returns the file's SHA-256 (hex)."""
        self._stop()
        if self._error is not None:
            raise UnitFailed(f"writing the shard failed: {self._error}") from self._error
        return self._hash.finish()

    def abort(self) -> None:
        self._error = self._error or UnitFailed("aborted")
        self._stop()


def run_pipelined(
    jobs: Sequence[TensorJob],
    reader: TensorReader,
    fd: int,
    header: bytes,
    size: int,
    device: torch.device,
    convert: Callable[[TensorJob, Any, ShardSink], Any],
    *,
    read_budget: int,
    write_budget: int,
    hold_budget: int,
    direct: TensorReader | None = None,
) -> tuple[list[Any], str]:
    """Run `convert(job, reader_like, sink)` for every job, in order; returns the results and the
    SHA-256 of the `size`-byte shard in `fd` (its `header` is written here)."""
    results: list[Any] = []
    sink = ShardSink(fd, size, device, budget_bytes=write_budget, hold_bytes=hold_budget)
    prefetch = Prefetcher(reader, jobs, device, budget_bytes=read_budget, direct=direct)
    try:
        sink.write_bytes(header, 0)
        for job in jobs:
            results.append(convert(job, prefetch, sink))
        prefetch.close()
        sha256 = sink.finish()
    except BaseException:
        prefetch.close()
        sink.abort()
        raise
    return results, sha256
