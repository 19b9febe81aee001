"""Publishing as a commit: stage, verify, copy to the final prefix, write the marker LAST.

Layout: shards are written under `<final>/.staging/<run-id>/`; `commit` checks every staged file
against the caller's records (size and SHA-256), copies them to `<final>/` with conditional
writes (never replacing a file that differs), re-checks the copies, and finally writes the marker
object conditionally (`IfNoneMatch="*"` on S3, link-if-absent locally). Consumers treat a prefix as
published only when the marker exists, so a crash at any point leaves nothing published, and a
published version is never overwritten: a second commit raises AlreadyExists. So a commit also
removes what other runs staged under the same prefix: it can never be published there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import AlreadyExists, CommitRefused, ObjectNotFound
from infra.storage.base import ObjectInfo, ObjectWriter, Storage, WriteResult, join_key

__all__ = [
    "DEFAULT_MARKER",
    "Expected",
    "Publisher",
    "commit",
    "is_published",
    "staging_prefix",
    "staging_root",
]

DEFAULT_MARKER = "_QUANTFLEET_PUBLISHED.json"


class Expected(BaseModel):
    """What a staged file must be: recorded when it was written (see WriteResult)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=0)
    sha256: str

    @classmethod
    def of(cls, result: WriteResult) -> Expected:
        return cls(size=result.size, sha256=result.sha256)


def staging_root(final_prefix: str) -> str:
    """The folder under `final_prefix` that holds every run's staging area."""
    return join_key(final_prefix, ".staging")


def staging_prefix(final_prefix: str, run_id: str) -> str:
    """Where run `run_id` stages the files it will publish under `final_prefix`."""
    return join_key(staging_root(final_prefix), run_id)


def is_published(storage: Storage, prefix: str, marker_name: str = DEFAULT_MARKER) -> bool:
    """True when `prefix` holds a committed version (its marker exists)."""
    return storage.exists(join_key(prefix, marker_name))


def _as_expected(value: Expected | tuple[int, str]) -> Expected:
    return value if isinstance(value, Expected) else Expected(size=value[0], sha256=value[1])


def _check(storage: Storage, key: str, want: Expected, *, deep: bool, what: str) -> ObjectInfo:
    uri = storage.uri(key)
    try:
        info = storage.stat(key)
    except ObjectNotFound as exc:
        raise CommitRefused(f"{uri}: {what} file is missing") from exc
    if info.size != want.size:
        raise CommitRefused(f"{uri}: {what} file has {info.size} bytes, expected {want.size}")
    recorded = info.sha256
    if deep or recorded is None:  # no recorded hash (e.g. no xattr support): hash the bytes
        recorded = storage.hash_object(key)
    if recorded != want.sha256:
        raise CommitRefused(f"{uri}: {what} file has SHA-256 {recorded}, expected {want.sha256}")
    return info


def _default_manifest(expected: Mapping[str, Expected]) -> bytes:
    files = {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(expected.items())}
    return json.dumps({"format": "quantfleet-publish/1", "files": files}, indent=2).encode()


def _staged_elsewhere(storage: Storage, staging: str, dst: str, rel: str) -> str | None:
    """The key of another run's staged copy of the file at `dst` (same name, size and SHA-256).

    Such a file was put there by an interrupted commit of that run: quantfleet wrote it.
    """
    root = staging.rpartition("/")[0]  # `<final>/.staging`, which holds every run's staging area
    if not root:
        return None
    info = storage.stat(dst)
    sha = None
    for other in storage.list(root + "/"):
        if other.key.startswith(staging + "/") or other.size != info.size:
            continue
        if other.key[len(root) + 1 :].partition("/")[2] != rel:
            continue
        sha = sha or info.sha256 or storage.hash_object(dst)
        if (storage.stat(other.key).sha256 or storage.hash_object(other.key)) == sha:
            return other.key
    return None


def _promote(
    storage: Storage, staging: str, rel: str, dst: str, want: Expected, *, deep: bool
) -> None:
    """Copy one verified staged file to its final key without ever replacing a different file."""
    src = join_key(staging, rel)
    try:
        storage.copy(src, dst, if_absent=True)
    except AlreadyExists:
        # Left by an earlier, interrupted commit of the same bytes: accept it; otherwise refuse.
        try:
            _check(storage, dst, want, deep=deep, what="existing final")
        except CommitRefused as exc:
            # Only a file we can show is ours (another run's staged bytes) may be called safe to
            # delete; anything else may be the user's, and is never touched nor advised away.
            ours = _staged_elsewhere(storage, staging, dst, rel)
            if ours is not None:
                raise AlreadyExists(
                    f"{storage.uri(dst)}: in the way is a file quantfleet left there in an unfinished "
                    f"commit of another run (the same bytes as its staged {storage.uri(ours)}); no "
                    "published version refers to it, so it is safe to delete: delete it and re-run "
                    "to commit this run's result"
                ) from exc
            raise AlreadyExists(
                f"{storage.uri(dst)}: in the way is a file no quantfleet staging area accounts for, "
                "and quantfleet never replaces such a file: publish to an empty destination (this "
                f"run's result stays staged in {storage.uri(staging)})"
            ) from exc


def commit(
    storage: Storage,
    staging: str,
    final_prefix: str,
    expected: Mapping[str, Expected | tuple[int, str]],
    *,
    marker_name: str = DEFAULT_MARKER,
    marker_bytes: bytes | None = None,
    deep_verify: bool = False,
    cleanup: bool = True,
) -> ObjectInfo:
    """Publish the staged files `expected` (key relative to `staging` -> size, sha256).

    Refuses (CommitRefused) if a staged file is missing or differs; raises AlreadyExists if
    `final_prefix` is already published. `marker_bytes` defaults to a JSON manifest of the files.
    `deep_verify` re-reads every byte instead of trusting the recorded SHA-256. Returns the
    marker's ObjectInfo.
    """
    want = {k: _as_expected(v) for k, v in expected.items()}
    marker_key = join_key(final_prefix, marker_name)
    if marker_name in want:
        raise CommitRefused(f"{storage.uri(marker_key)}: the marker name is also a data file")
    if storage.exists(marker_key):
        raise AlreadyExists(f"{storage.uri(final_prefix)}: already published; not overwriting")
    for key, e in sorted(want.items()):
        _check(storage, join_key(staging, key), e, deep=deep_verify, what="staged")
    for key, e in sorted(want.items()):
        _promote(storage, staging, key, join_key(final_prefix, key), e, deep=deep_verify)
    for key, e in sorted(want.items()):
        _check(storage, join_key(final_prefix, key), e, deep=False, what="published")
    body = marker_bytes if marker_bytes is not None else _default_manifest(want)
    storage.put_bytes(marker_key, body, if_absent=True)  # the commit point
    if cleanup:
        # Nothing of staging stays behind: unfinished writes of killed workers (temp files,
        # multipart uploads) first, then the staged objects and, locally, the emptied folders.
        # Nor does other runs' staging here (another recipe's, one a gate failed): a published
        # prefix takes no second commit, so it could never be published and only holds space.
        for prefix in dict.fromkeys((staging, staging_root(final_prefix))):
            storage.abort_stale_uploads(prefix + "/")
            storage.delete_prefix(prefix + "/")
    return storage.stat(marker_key)


class Publisher:
    """One run's view of a destination: stage files, then commit them in one step."""

    def __init__(
        self, storage: Storage, final_prefix: str, run_id: str, marker_name: str = DEFAULT_MARKER
    ) -> None:
        self.storage = storage
        self.final_prefix = final_prefix.strip("/")
        self.run_id = run_id
        self.marker_name = marker_name
        self.staging = staging_prefix(self.final_prefix, run_id)
        self.records: dict[str, Expected] = {}

    def stage_key(self, key: str) -> str:
        """The storage key where `key` (relative to the final prefix) is staged."""
        return join_key(self.staging, key)

    def stage_writer(self, key: str, *, size_hint: int | None = None) -> ObjectWriter:
        """A streaming writer into staging; call `record(result)` with what close() returns."""
        return self.storage.open_writer(self.stage_key(key), size_hint=size_hint)

    def record(self, key: str, result: WriteResult) -> None:
        self.records[key] = Expected.of(result)

    def stage_bytes(self, key: str, data: bytes) -> WriteResult:
        result = self.storage.put_bytes(self.stage_key(key), data)
        self.record(key, result)
        return result

    def stage_copy(self, src_key: str, key: str) -> None:
        """Stage a side file (config.json, tokenizer...) copied from elsewhere in the storage."""
        info = self.storage.copy(src_key, self.stage_key(key))
        sha = info.sha256 or self.storage.hash_object(self.stage_key(key))
        self.records[key] = Expected(size=info.size, sha256=sha)

    def is_published(self) -> bool:
        return is_published(self.storage, self.final_prefix, self.marker_name)

    def commit(
        self,
        expected: Mapping[str, Expected | tuple[int, str]] | None = None,
        *,
        marker_bytes: bytes | None = None,
        deep_verify: bool = False,
    ) -> ObjectInfo:
        return commit(
            self.storage,
            self.staging,
            self.final_prefix,
            self.records if expected is None else expected,
            marker_name=self.marker_name,
            marker_bytes=marker_bytes,
            deep_verify=deep_verify,
        )
