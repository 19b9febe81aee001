"""Serialise a GGUF (version 3) header from metadata and tensor descriptions.

Format (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; each
metadata pair as key string, value type u32, value; each tensor as name string, dimension count
u32, dimensions u64 (ne[0] first: the innermost, a row's length), type u32, data offset u64
relative to the data section; padding to `general.alignment` (32); then the tensor data, each
tensor starting at an aligned offset. Strings are a u64 length and UTF-8 bytes. Value type codes
come from the `gguf` package (`GGUFValueType`), tensor type codes from `GGMLQuantizationType`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import gguf

__all__ = ["GGUFTensor", "MetadataValue", "layout", "split_file_name", "split_metadata", "ALIGNMENT"]

ALIGNMENT = 32
_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d", gguf.GGUFValueType.BOOL: "<?",
}


@dataclass(frozen=True, slots=True)
class MetadataValue:
    """One metadata value with its GGUF type; arrays name their element type in `item_type`."""

    type: gguf.GGUFValueType
    value: Any
    item_type: gguf.GGUFValueType | None = None


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """A tensor as GGUF lists it: `dims` innermost first (a Hugging Face (out, in) weight is
    (in, out)), its GGML type name and its size in bytes."""

    name: str
    dims: tuple[int, ...]
    type_name: str
    nbytes: int


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _value(kind: gguf.GGUFValueType, value: Any) -> bytes:
    if kind == gguf.GGUFValueType.STRING:
        return _string(value)
    return struct.pack(_SCALARS[kind], value)


def _metadata(key: str, item: MetadataValue) -> bytes:
    parts = [_string(key), struct.pack("<I", int(item.type))]
    if item.type == gguf.GGUFValueType.ARRAY:
        assert item.item_type is not None
        parts.append(struct.pack("<IQ", int(item.item_type), len(item.value)))
        if item.item_type in _SCALARS:
            fmt = _SCALARS[item.item_type]
            parts.append(struct.pack(f"<{len(item.value)}{fmt[1]}", *item.value))
        else:
            parts.extend(_value(item.item_type, v) for v in item.value)
    else:
        parts.append(_value(item.type, item.value))
    return b"".join(parts)


def _aligned(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def layout(
    metadata: dict[str, MetadataValue], tensors: list[GGUFTensor]
) -> tuple[bytes, dict[str, int], int]:
    """(header bytes incl. padding, absolute file offset of each tensor, file size)."""
    relative: dict[str, int] = {}
    position = 0
    infos = []
    for tensor in tensors:
        position = _aligned(position)
        relative[tensor.name] = position
        kind = gguf.GGMLQuantizationType[tensor.type_name]
        infos.append(
            _string(tensor.name)
            + struct.pack(f"<I{len(tensor.dims)}Q", len(tensor.dims), *tensor.dims)
            + struct.pack("<IQ", int(kind), position)
        )
        position += tensor.nbytes
    head = [struct.pack("<IIQQ", gguf.GGUF_MAGIC, 3, len(tensors), len(metadata))]
    head.extend(_metadata(key, item) for key, item in metadata.items())
    head.extend(infos)
    header = b"".join(head)
    header += b"\0" * (_aligned(len(header)) - len(header))
    offsets = {name: len(header) + offset for name, offset in relative.items()}
    return header, offsets, len(header) + position


def split_file_name(index: int, count: int, stem: str = "model") -> str:
    """llama.cpp's split naming (`llama_split_path`): one file is `model.gguf`."""
    if count == 1:
        return f"{stem}.gguf"
    return f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"


def split_metadata(index: int, count: int, total_tensors: int) -> dict[str, MetadataValue]:
    """The keys llama.cpp's loader reads to find and check the other splits (gguf-split's)."""
    return {
        gguf.Keys.Split.LLM_KV_SPLIT_NO: MetadataValue(gguf.GGUFValueType.UINT16, index),
        gguf.Keys.Split.LLM_KV_SPLIT_COUNT: MetadataValue(gguf.GGUFValueType.UINT16, count),
        gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT: MetadataValue(gguf.GGUFValueType.INT32, total_tensors),
    }
