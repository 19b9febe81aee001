"""Errors of the infra layer.

Callers tell failures apart by class, never by message text. Every error names the URI it is about,
so a one-line CLI message is enough for a user to act on it.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AlreadyExists",
    "CatalogError",
    "CheckpointError",
    "CommitRefused",
    "CredentialsRejected",
    "HeaderError",
    "InfraError",
    "IntegrityError",
    "InvalidURI",
    "MissingShardError",
    "TruncatedFileError",
    "ObjectNotFound",
    "PickleWeightsError",
    "StorageError",
    "TensorSpecError",
    "TransientStorageError",
]


class InfraError(Exception):
    """Base of every error raised by the infra layer."""


# --- storage -------------------------------------------------------------------------------


class StorageError(InfraError):
    """A storage operation failed; the message names the URI."""


class InvalidURI(StorageError):
    """A storage URI or key cannot be used (unknown scheme, escapes the root, empty bucket...)."""


class ObjectNotFound(StorageError):
    """The object, prefix or bucket does not exist (404, NoSuchKey, NoSuchBucket)."""


class AccessDenied(StorageError):
    """The credentials may not perform the operation (403). Retrying does not help."""


class CredentialsRejected(AccessDenied):
    """The credentials themselves are refused (an expired session token, an unknown key, a bad
    signature, none found): every request made with them fails, whatever it asks for."""


class AlreadyExists(StorageError):
    """A conditional write found the key taken; nothing was overwritten."""


class TransientStorageError(StorageError):
    """A fault that may pass (timeout, 5xx, throttling, reset); raised once retries are spent."""


class IntegrityError(StorageError):
    """Bytes read back or reported by the server do not match what was written."""


class CommitRefused(StorageError):
    """A publish commit found staged files missing or different from the records."""


# --- checkpoints ---------------------------------------------------------------------------


class CheckpointError(InfraError):
    """A checkpoint (safetensors files, index) is malformed or inconsistent."""


class HeaderError(CheckpointError):
    """A safetensors header violates the format; the message names the file and the tensor."""


class TruncatedFileError(HeaderError):
    """A safetensors file shorter than its own header says (or than any header): a file still
    being written by a copy in progress looks like this, and so does one whose copy was cut short."""


class CatalogError(CheckpointError):
    """The files of a checkpoint disagree with each other or with the index."""


class MissingShardError(CatalogError):
    """A shard file the checkpoint needs is not there: the index names it, or its numbered
    siblings (`-00003-of-00005`) say it exists. A checkpoint still uploading looks like this."""


class PickleWeightsError(CatalogError):
    """Only pickle weights (.bin/.pt/.pth/.ckpt) were found; they are never unpickled."""


class TensorSpecError(CheckpointError):
    """A tensor handed to the streaming writer differs from what was declared up front."""
