"""One ranged read for a run of adjacent small tensors, instead of one request per tensor.

A MoE checkpoint holds hundreds of thousands of small expert tensors (and their scales) packed
back to back; on S3 one GET each costs more in latency than in bytes. Before a unit starts, the
byte ranges it will read (every part of a quantized source weight too) are cut into spans of
adjacent small ranges in the same file, at most `max_span` bytes each; the first read inside a span
fetches the whole span, and the tensors in it are views of that buffer. Large tensors are read
as before (chunked, concurrent).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from infra.safetensors import TORCH_DTYPE, TensorInfo, TensorReader
from infra.storage import Storage
from workers.units import TensorJob

__all__ = ["BatchedReader"]


def _ranges(jobs: Iterable[TensorJob]) -> list[tuple[str, int, int]]:
    out = []
    for job in jobs:
        if job.parts:
            out += [(p.file, p.begin, p.end) for p in job.parts]
        else:
            out.append((job.file, job.begin, job.end))
    return out


class BatchedReader(TensorReader):
    """A `TensorReader` that serves the unit's adjacent small tensors from shared span reads."""

    def __init__(
        self, storage: Storage, jobs: Iterable[TensorJob], *, small: int = 1 << 20, max_span: int = 16 << 20,
        max_concurrent_reads: int = 4,
    ) -> None:
        super().__init__(storage, max_concurrent_reads=max_concurrent_reads)
        self._span_of: dict[tuple[str, int], tuple[str, int, int]] = {}
        run: list[tuple[str, int, int]] = []

        def close_run() -> None:
            if len(run) > 1:
                span = (run[0][0], run[0][1], run[-1][2])
                for file, begin, _ in run:
                    self._span_of[(file, begin)] = span
            run.clear()

        for file, begin, end in _ranges(jobs):
            size = end - begin
            if size > small:
                close_run()
                continue
            if run and (run[-1][0] != file or run[-1][2] != begin or end - run[0][1] > max_span):
                close_run()
            run.append((file, begin, end))
        close_run()
        self._span: tuple[str, int, int] | None = None
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self.span_reads = 0

    def read(
        self, key: str, info: TensorInfo, rows: tuple[int, int] | None = None, *, pin_memory: bool = False
    ) -> torch.Tensor:
        span = self._span_of.get((key, info.begin)) if rows is None and not pin_memory else None
        if span is None or info.end > span[2]:
            return super().read(key, info, rows, pin_memory=pin_memory)
        if span != self._span:
            self._buffer = torch.empty(span[2] - span[1], dtype=torch.uint8)
            self.read_into(key, span[1], self._buffer)
            self._span = span
            self.span_reads += 1
        raw = self._buffer[info.begin - span[1] : info.end - span[1]]
        if (info.begin - span[1]) % raw.new_empty(0, dtype=TORCH_DTYPE[info.dtype]).element_size():
            raw = raw.clone()  # a view must start at a multiple of the element size
        return raw.view(TORCH_DTYPE[info.dtype]).reshape(info.shape)
