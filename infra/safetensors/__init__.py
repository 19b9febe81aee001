"""safetensors I/O for huge checkpoints: strict headers, catalogs, ranged tensor reads, streaming
writes. Nothing here loads a whole file; nothing here unpickles."""

from __future__ import annotations

from infra.safetensors.catalog import (
    INDEX_NAME,
    Catalog,
    CatalogEntry,
    build_catalog,
    read_index,
    read_model_config,
)
from infra.safetensors.dtypes import DTYPE_SIZE, TORCH_DTYPE, dtype_name_of
from infra.safetensors.header import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    parse_header,
    read_header,
)
from infra.safetensors.reader import TensorReader
from infra.safetensors.writer import (
    SafetensorsStreamWriter,
    TensorSpec,
    layout,
    open_safetensors_writer,
)

__all__ = [
    "DTYPE_SIZE",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "TORCH_DTYPE",
    "Catalog",
    "CatalogEntry",
    "SafetensorsHeader",
    "SafetensorsStreamWriter",
    "TensorInfo",
    "TensorReader",
    "TensorSpec",
    "build_catalog",
    "read_index",
    "read_model_config",
    "dtype_name_of",
    "layout",
    "open_safetensors_writer",
    "parse_header",
    "read_header",
]
