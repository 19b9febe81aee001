"""Helpers to build safetensors bytes (valid or deliberately broken) in tests."""

from __future__ import annotations

import json
import struct
from typing import Any

__all__ = ["raw_file", "valid_header"]


def raw_file(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """8-byte length + header (dict -> compact JSON, or raw bytes) + data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def valid_header() -> dict[str, Any]:
    return {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [2], "data_offsets": [16, 20]},
    }
