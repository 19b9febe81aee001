"""Storage backends behind one small interface, opened from a URI.

>>> store = open_storage("s3://bucket/models/llama")        # or "/data/models", "file:///data"
>>> with store.open_writer("model-00001.safetensors", size_hint=n) as w:
...     w.write(chunk)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.storage.base import ObjectInfo, ObjectWriter, Storage, WriteResult, join_key
from infra.storage.local import LocalStorage
from infra.storage.uri import StorageURI, parse_uri

if TYPE_CHECKING:
    from infra.storage.s3 import S3Options, S3Storage

__all__ = [
    "LocalStorage",
    "ObjectInfo",
    "ObjectWriter",
    "S3Options",
    "S3Storage",
    "Storage",
    "StorageURI",
    "WriteResult",
    "join_key",
    "open_storage",
    "parse_uri",
]


def __getattr__(name: str) -> Any:
    # The S3 backend (and so boto3) loads on first use: a conversion between local paths, e.g. on
    # a GPU node whose image has no boto3, never imports it.
    if name in ("S3Options", "S3Storage"):
        from infra.storage import s3

        return getattr(s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_storage(uri: str | Path, **opts: Any) -> Storage:
    """Open the storage a URI names.

    Plain paths and file:// URIs give a `LocalStorage` (option: fsync); s3://bucket/prefix
    gives an `S3Storage` (options: the fields of `S3Options`, e.g. endpoint_url, region, retry,
    min_part_size, or `client=` a ready boto3 client). Unknown options raise a pydantic
    ValidationError rather than being silently dropped. `synthetic://PRESET?...` gives a read-only
    `SyntheticStorage` (a declared checkpoint made up on read; see infra/storage/synthetic.py).
    """
    if str(uri).lower().startswith("synthetic://"):
        from infra.storage.synthetic import SyntheticStorage  # lazily: only benchmarks and tests use it

        if opts:
            raise TypeError(f"synthetic storage takes its options in the URI, not {sorted(opts)}")
        return SyntheticStorage.from_uri(str(uri))
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return LocalStorage(parsed.path, **opts)
    from infra.storage.s3 import S3Options, S3Storage

    client = opts.pop("client", None)
    return S3Storage(parsed.bucket, parsed.path, S3Options(**opts), client=client)
