"""Strict safetensors header parsing: one or two ranged reads, every rule of the format checked.

Offsets in `TensorInfo` are ABSOLUTE file offsets (data_start + data_offsets), so a reader needs
nothing but the TensorInfo to fetch a tensor with one ranged read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from infra.errors import HeaderError, TruncatedFileError
from infra.safetensors.dtypes import DTYPE_SIZE
from infra.storage.base import Storage

__all__ = [
    "HEADER_PROBE_BYTES",
    "MAX_HEADER_BYTES",
    "SafetensorsHeader",
    "TensorInfo",
    "parse_header",
    "read_header",
]

HEADER_PROBE_BYTES = 64 * 1024  # first read; most headers fit, larger ones need a second read
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a safetensors file; `begin`/`end` are absolute byte offsets in the file.

    A slotted dataclass, not a pydantic model: a frontier MoE checkpoint has a million of these,
    and the header parser has already validated every field (pydantic records cost ~1.5 KB each).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsHeader(BaseModel):
    """A validated header; `tensors` are in file (offset) order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    file_size: int
    data_start: int  # 8 + header length
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None = None

    def tensor(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        raise KeyError(name)


def _no_duplicates(uri: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise HeaderError(f"{uri}: duplicate key {key!r} in the header JSON")
            out[key] = value
        return out

    return hook


# What a file shorter than its header says is, most often: one still being copied into place.
CUT_SHORT = "the file is incomplete (still being copied, or cut short)"


def header_length(prefix: bytes, file_size: int, uri: str) -> int:
    """Validate the 8-byte length prefix against the file size and the 100 MB limit."""
    if file_size < 8 or len(prefix) < 8:
        raise TruncatedFileError(f"{uri}: file is {file_size} bytes, too short for a safetensors header; "
                                 f"{CUT_SHORT}")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"{uri}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise TruncatedFileError(f"{uri}: header length {n} runs past the end of the file ({file_size} "
                                 f"bytes); {CUT_SHORT}")
    if n < 2:
        raise HeaderError(f"{uri}: header length {n} is too small for a JSON object")
    return int(n)


def _decode_json(raw: bytes, uri: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{uri}: header is not valid UTF-8 (byte {exc.start})") from exc
    if not text.startswith("{"):
        raise HeaderError(f"{uri}: header does not start with '{{'")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates(uri))
    except HeaderError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise HeaderError(f"{uri}: header is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise HeaderError(f"{uri}: header is not a JSON object")
    return obj


def _check_metadata(value: Any, uri: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise HeaderError(f"{uri}: __metadata__ must map strings to strings")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_entry(name: str, entry: Any, data_start: int, uri: str) -> TensorInfo:
    where = f"{uri}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: entry is not a JSON object")
    if set(entry) != _ENTRY_KEYS:
        raise HeaderError(f"{where}: entry keys are {sorted(entry)}, expected {sorted(_ENTRY_KEYS)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZE:
        raise HeaderError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_SIZE))})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(f"{where}: data_offsets {offsets!r} is not [begin, end] with begin <= end")
    expected = math.prod(shape) * DTYPE_SIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise HeaderError(
            f"{where}: {dtype}{shape} needs {expected} bytes but data_offsets {offsets} "
            f"hold {offsets[1] - offsets[0]}"
        )
    return TensorInfo(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        begin=data_start + offsets[0],
        end=data_start + offsets[1],
    )


def _check_layout(tensors: list[TensorInfo], data_start: int, file_size: int, uri: str) -> None:
    """Contiguous from 0, no overlap, no gap, and the last tensor ends exactly at end of file."""
    position, previous = data_start, None
    for info in tensors:
        rel = (info.begin - data_start, info.end - data_start)
        if info.begin < position:
            raise HeaderError(
                f"{uri}: tensor {info.name!r}: data_offsets {list(rel)} overlap tensor "
                f"{previous!r} (which ends at {position - data_start})"
            )
        if info.begin > position:
            after = f"after tensor {previous!r}" if previous else "at the start of the data"
            raise HeaderError(f"{uri}: tensor {info.name!r}: gap of {info.begin - position} bytes {after}")
        position, previous = info.end, info.name
    if position > file_size:
        raise TruncatedFileError(
            f"{uri}: tensor {previous!r} ends at byte {position}, past the end of the file "
            f"({file_size} bytes); {CUT_SHORT}"
        )
    if position < file_size:
        raise HeaderError(
            f"{uri}: {file_size - position} bytes after the last tensor; the data buffer must "
            "be covered exactly"
        )


def parse_header(header: bytes, file_size: int, uri: str) -> SafetensorsHeader:
    """Parse and validate a header from the file's first bytes (at least 8 + N of them)."""
    n = header_length(header, file_size, uri)
    if len(header) < 8 + n:
        raise HeaderError(f"{uri}: got {len(header)} header bytes, need {8 + n}")
    data_start = 8 + n
    obj = _decode_json(header[8:data_start], uri)
    metadata = _check_metadata(obj.pop("__metadata__"), uri) if "__metadata__" in obj else None
    tensors = [_tensor_entry(name, entry, data_start, uri) for name, entry in obj.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_layout(tensors, data_start, file_size, uri)
    return SafetensorsHeader.model_construct(
        uri=uri,
        file_size=file_size,
        data_start=data_start,
        tensors=tuple(tensors),
        metadata=metadata,
    )


def read_header(
    storage: Storage, key: str, *, file_size: int | None = None, probe: int = HEADER_PROBE_BYTES
) -> SafetensorsHeader:
    """Read and validate the header of `key` with one ranged read (two if it is large)."""
    uri = storage.uri(key)
    size = storage.stat(key).size if file_size is None else file_size
    first = storage.read_range(key, 0, min(probe, size)) if size else b""
    n = header_length(first, size, uri)
    if 8 + n > len(first):
        first += storage.read_range(key, len(first), 8 + n - len(first))
    return parse_header(first, size, uri)
