"""Parsing of the storage URIs users type: plain paths, file://..., s3://bucket/prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict

from infra.errors import InvalidURI

__all__ = ["StorageURI", "parse_uri"]


class StorageURI(BaseModel):
    """A parsed storage location: a local folder, or an S3 bucket and key prefix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["file", "s3"]
    bucket: str = ""  # s3 only
    path: str  # local: absolute folder path; s3: key prefix without leading/trailing '/'

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return f"file://{self.path}"


def parse_uri(uri: str | Path) -> StorageURI:
    """Parse `uri`; a string without a scheme is a local path (relative to the cwd)."""
    text = str(uri)
    if not text:
        raise InvalidURI("empty storage URI")
    if "://" not in text:
        return StorageURI(scheme="file", path=str(Path(text).expanduser().resolve()))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidURI(f"{text}: file:// URIs must name a local path (file:///abs/path)")
        return StorageURI(scheme="file", path=str(Path(unquote(parts.path)).resolve()))
    if scheme in ("s3", "s3a"):
        bucket = parts.netloc
        if not bucket:
            raise InvalidURI(f"{text}: missing bucket name (expected s3://bucket/prefix)")
        if parts.query or parts.fragment:
            raise InvalidURI(f"{text}: S3 URIs take no query or fragment")
        return StorageURI(scheme="s3", bucket=bucket, path=parts.path.strip("/"))
    raise InvalidURI(f"{text}: unsupported scheme {parts.scheme!r} (use a path, file:// or s3://)")
