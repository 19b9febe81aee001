"""Streaming safetensors writer: header first, then tensors one at a time, byte-identical to
`safetensors.torch.save_file` for the same tensors.

Every output tensor's name, dtype and shape must be declared up front; that fixes every offset,
so the header can be written before any data and a worker never holds more than the tensor it is
writing. Ordering and JSON spelling follow safetensors 0.8: tensors sorted by dtype rank
(descending, see dtypes.DTYPE_RANK) then name, compact JSON with raw UTF-8, `__metadata__` first,
the header padded with spaces to a multiple of 8. One difference: save_file writes metadata keys in
Rust HashMap order (random per process), so with two or more metadata keys the bytes cannot be
reproduced; we write them sorted.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from infra.errors import TensorSpecError
from infra.safetensors.dtypes import DTYPE_RANK, DTYPE_SIZE, dtype_name_of
from infra.storage.base import ObjectWriter, Storage, WriteResult

__all__ = [
    "SafetensorsStreamWriter",
    "TensorSpec",
    "layout",
    "open_safetensors_writer",
]


class TensorSpec(BaseModel):
    """An output tensor declared before writing: name, safetensors dtype name, shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: tuple[int, ...]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in DTYPE_SIZE:
            raise ValueError(f"unknown dtype {v!r}; known: {', '.join(sorted(DTYPE_SIZE))}")
        return v

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in v):
            raise ValueError(f"shape {v} has a negative dimension")
        return v

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZE[self.dtype]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name=name, dtype=dtype_name_of(tensor.dtype), shape=tuple(tensor.shape))


def layout(
    specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[TensorSpec]]:
    """The complete header bytes (length prefix included) and the tensors in data order."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise TensorSpecError(f"tensor names declared twice: {dup}")
    if "__metadata__" in names:
        raise TensorSpecError("'__metadata__' is reserved and cannot name a tensor")
    ordered = sorted(specs, key=lambda s: (-DTYPE_RANK[s.dtype], s.name))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for spec in ordered:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads so the data buffer starts 8-aligned
    return struct.pack("<Q", len(text)) + text, ordered


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (a contiguous copy only if it is not contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")


class SafetensorsStreamWriter:
    """Writes one safetensors file through an ObjectWriter, tensor by tensor, in header order.

    `__exit__` with an exception in flight aborts the underlying write: no partial file appears.
    """

    def __init__(
        self,
        sink: ObjectWriter,
        specs: Sequence[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        *,
        uri: str = "<stream>",
    ) -> None:
        self.uri = uri
        self._sink = sink
        header, self._order = layout(specs, metadata)
        self.total_size = len(header) + sum(s.nbytes for s in self._order)
        self._next = 0
        self._sink.write(header)

    @property
    def order(self) -> list[str]:
        """Tensor names in the order `write` must receive them."""
        return [s.name for s in self._order]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the next name in `order`, with the declared spec."""
        if self._next >= len(self._order):
            raise TensorSpecError(f"{self.uri}: tensor {name!r}: every declared tensor is written")
        spec = self._order[self._next]
        if name != spec.name:
            raise TensorSpecError(
                f"{self.uri}: tensor {name!r} written out of order; expected {spec.name!r} next"
            )
        got = TensorSpec.of(name, tensor)
        if (got.dtype, got.shape) != (spec.dtype, spec.shape):
            raise TensorSpecError(
                f"{self.uri}: tensor {name!r} is {got.dtype}{list(got.shape)}, declared "
                f"{spec.dtype}{list(spec.shape)}"
            )
        self._sink.write(_tensor_bytes(tensor))
        self._next += 1

    def close(self) -> WriteResult:
        """Finish the file; TensorSpecError (and nothing written) if a tensor is missing."""
        if self._next < len(self._order):
            missing = [s.name for s in self._order[self._next :]]
            self._sink.abort()
            raise TensorSpecError(f"{self.uri}: closed before writing tensors {missing}")
        return self._sink.close()

    def abort(self) -> None:
        self._sink.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()


def open_safetensors_writer(
    storage: Storage,
    key: str,
    specs: Sequence[TensorSpec],
    metadata: Mapping[str, str] | None = None,
    *,
    if_absent: bool = False,
) -> SafetensorsStreamWriter:
    """A streaming writer for `key`; the exact file size is passed on as the upload size hint."""
    header, ordered = layout(specs, metadata)
    size = len(header) + sum(s.nbytes for s in ordered)
    sink = storage.open_writer(key, size_hint=size, if_absent=if_absent)
    try:
        return SafetensorsStreamWriter(sink, specs, metadata, uri=storage.uri(key))
    except BaseException:
        sink.abort()
        raise
