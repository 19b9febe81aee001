"""Fetch tensors (or leading-dim row ranges) by ranged reads, straight into tensor memory.

The destination is allocated once as `torch.empty(n, dtype=uint8)`; storage reads fill its memory
through a memoryview and the result is `.view(dtype).reshape(shape)` of that same buffer, so no
intermediate bytes object is ever built. Large tensors are split into chunks read concurrently;
`max_concurrent_reads` bounds the requests in flight per reader (per worker).

Where the storage can map a file (local disk), a tensor of at least `map_min_bytes` is instead a
copy-on-write map of the file's bytes: no copy and no freshly faulted memory, which on a 2-core
machine was the largest cost of a tensor kept as it is (docs/benchmarks.md). Small tensors are
read: a map costs two system calls and its page faults, a small read one call.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Self

import torch

from infra.errors import CheckpointError
from infra.safetensors.dtypes import DTYPE_SIZE, TORCH_DTYPE
from infra.safetensors.header import TensorInfo
from infra.storage.base import Storage

__all__ = ["TensorReader", "row_range_bytes"]


def row_range_bytes(info: TensorInfo, start: int, stop: int, uri: str) -> tuple[int, int]:
    """Absolute (offset, length) of rows [start, stop) of the tensor's leading dimension."""
    if not info.shape:
        raise CheckpointError(f"{uri}: tensor {info.name!r} is a scalar; it has no rows to slice")
    rows = info.shape[0]
    if not 0 <= start <= stop <= rows:
        raise CheckpointError(f"{uri}: tensor {info.name!r}: rows [{start}, {stop}) are outside [0, {rows})")
    row_bytes = math.prod(info.shape[1:]) * DTYPE_SIZE[info.dtype]
    return info.begin + start * row_bytes, (stop - start) * row_bytes


class TensorReader:
    """Reads tensors of safetensors files in one storage; use as a context manager or close()."""

    def __init__(
        self, storage: Storage, *, max_concurrent_reads: int = 4, chunk_bytes: int = 16 << 20,
        map_min_bytes: int = 1 << 20,
    ) -> None:
        if max_concurrent_reads < 1 or chunk_bytes < 1:
            raise ValueError("max_concurrent_reads and chunk_bytes must be positive")
        self.storage = storage
        self.chunk_bytes = chunk_bytes
        self.map_min_bytes = map_min_bytes
        self._pool = ThreadPoolExecutor(max_concurrent_reads, thread_name_prefix="qf-read")

    def read(
        self, key: str, info: TensorInfo, rows: tuple[int, int] | None = None, *, pin_memory: bool = False
    ) -> torch.Tensor:
        """The tensor `info` of file `key`, or rows [start, stop) of its leading dimension.

        `pin_memory` reads into page-locked memory (CUDA builds only), so the copy to the GPU
        that follows can run asynchronously at full bus speed.
        """
        if rows is None:
            offset, length, shape = info.begin, info.nbytes, info.shape
        else:
            offset, length = row_range_bytes(info, rows[0], rows[1], self.storage.uri(key))
            shape = (rows[1] - rows[0], *info.shape[1:])
        dtype = TORCH_DTYPE[info.dtype]
        mapped = None
        if not pin_memory and length >= self.map_min_bytes and offset % DTYPE_SIZE[info.dtype] == 0:
            mapped = self.storage.map_range(key, offset, length)
        if mapped is not None:
            raw = torch.frombuffer(mapped, dtype=torch.uint8)
        else:
            raw = torch.empty(length, dtype=torch.uint8, pin_memory=pin_memory)
            self.read_into(key, offset, raw)
        return raw.view(dtype).reshape(shape)

    def read_into(self, key: str, offset: int, out: torch.Tensor) -> None:
        """Fill the contiguous uint8 tensor `out` with bytes of `key` from `offset`."""
        if out.dtype != torch.uint8 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("read_into needs a contiguous uint8 CPU tensor")
        view = out.numpy().data.cast("B")
        chunks = [
            (start, min(start + self.chunk_bytes, len(view)))
            for start in range(0, len(view), self.chunk_bytes)
        ]
        if len(chunks) <= 1:
            if chunks:
                self.storage.read_range_into(key, offset, view)
            return
        futures = [
            self._pool.submit(self.storage.read_range_into, key, offset + a, view[a:b]) for a, b in chunks
        ]
        for fut in futures:
            fut.result()  # first failure propagates; the others still finish writing their slice

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
