"""The versioned publishing layout: `<dest>/<model>/<recipe>/<version>/` and `<model>/<recipe>/LATEST`.

- A version's name is its plan id (flows/plan.py): a hash of the source identity (file keys,
  sizes, ETags or SHA-256), the recipe, the tool version and the shard size. Two runs that would
  produce the same bytes therefore target the same prefix, and the conditional marker write in
  infra/publish.py lets only one of them publish it; "already converted" is "that prefix holds a
  marker". Versions are ordered by LATEST and by the `observed_at` of the runs, not by name.
- LATEST is a small JSON object naming the version that converts what the source holds *now*.
  It is written only after the version's marker exists and the version's manifest checks out,
  and only by a run that observed the source no earlier than the run that wrote the current
  LATEST, so a slow run on old weights never moves it back. Every sync run re-asserts LATEST for
  the version of the source it just observed, so a lost race heals on the next run.
- `verify_uri` re-hashes every file a published version lists (streaming) and reports missing
  files, size or checksum mismatches and a manifest that disagrees with the marker.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from infra.errors import ObjectNotFound
from infra.publish import DEFAULT_MARKER, is_published
from infra.storage import Storage, join_key, open_storage
from infra.storage.uri import parse_uri

__all__ = [
    "LATEST_NAME",
    "MANIFEST_NAME",
    "Checkpoint",
    "Latest",
    "VerifyReport",
    "DEFAULT_VERIFY_PARALLEL",
    "published_versions",
    "published_bytes",
    "find_checkpoints",
    "version_prefix",
    "read_latest",
    "move_latest",
    "verify_version",
    "verify_uri",
    "utc_now",
]

LATEST_NAME = "LATEST"
MANIFEST_NAME = "quantfleet.json"  # a version's manifest (flows.finalize writes it)
# Files hashed at once by `verify`: enough streams to fill a node's link to object storage.
DEFAULT_VERIFY_PARALLEL = 8


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Checkpoint(BaseModel):
    """A folder under a source prefix that holds config.json and safetensors files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # its path relative to the source prefix ('/'-separated), or the prefix's own name
    uri: str


def _source_name(uri: str) -> str:
    parsed = parse_uri(uri)
    path = parsed.path.rstrip("/")
    if parsed.scheme == "s3":
        return posixpath.basename(path) or parsed.bucket
    return posixpath.basename(path) or "model"


def find_checkpoints(source_uri: str) -> list[Checkpoint]:
    """Every checkpoint under `source_uri`, in name order.

    A checkpoint is a folder with `config.json` and at least one `*.safetensors` file directly in
    it. Hidden folders (`.staging`, ...) and folders that are quantfleet outputs (they hold a
    publish marker) are not sources.
    """
    source = open_storage(source_uri)
    folders: dict[str, set[str]] = {}
    for info in source.list(""):
        folder, _, name = info.key.rpartition("/")
        if any(part.startswith(".") for part in folder.split("/") if part):
            continue
        folders.setdefault(folder, set()).add(name)
    found = []
    for folder, names in sorted(folders.items()):
        if "config.json" not in names or DEFAULT_MARKER in names:
            continue
        if not any(n.endswith(".safetensors") for n in names):
            continue
        name = folder or _source_name(source_uri)
        found.append(Checkpoint(name=name, uri=source.uri(folder) if folder else source.uri()))
    return found


def version_prefix(model: str, recipe: str, version: str) -> str:
    return join_key(model, recipe, version)


class Latest(BaseModel):
    """The body of `<model>/<recipe>/LATEST`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    manifest_sha256: str
    source_uri: str
    source_identity: str
    observed_at: str  # when the writing run read the source (ISO 8601, UTC)
    updated_at: str


def read_latest(storage: Storage, model: str, recipe: str) -> Latest | None:
    try:
        return Latest.model_validate_json(storage.read_bytes(join_key(model, recipe, LATEST_NAME)))
    except ObjectNotFound:
        return None


def _marker_files(storage: Storage, prefix: str) -> dict[str, dict[str, object]]:
    data = json.loads(storage.read_bytes(join_key(prefix, DEFAULT_MARKER)))
    files = data.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{storage.uri(join_key(prefix, DEFAULT_MARKER))}: no file list in the marker")
    return files


def move_latest(
    storage: Storage,
    model: str,
    recipe: str,
    version: str,
    *,
    source_uri: str,
    source_identity: str,
    observed_at: str,
) -> bool:
    """Point LATEST at `version` if it is published, checks out, and is the fresher observation.

    Returns True when LATEST was written, False when it already named `version` or a run that
    observed the source later wrote it. Raises ValueError when the version is not complete.
    """
    prefix = version_prefix(model, recipe, version)
    if not is_published(storage, prefix):
        raise ValueError(f"{storage.uri(prefix)}: not published; LATEST is not moved to it")
    files = _marker_files(storage, prefix)
    entry = files.get(MANIFEST_NAME)
    if not isinstance(entry, dict):
        raise ValueError(f"{storage.uri(prefix)}: the marker lists no {MANIFEST_NAME}")
    manifest_sha = str(entry["sha256"])
    actual = storage.hash_object(join_key(prefix, MANIFEST_NAME))
    if actual != manifest_sha:
        raise ValueError(f"{storage.uri(join_key(prefix, MANIFEST_NAME))}: SHA-256 {actual}, "
                         f"the marker says {manifest_sha}; LATEST is not moved")
    current = read_latest(storage, model, recipe)
    if current is not None and (current.version == version or current.observed_at > observed_at):
        return False
    body = Latest(version=version, manifest_sha256=manifest_sha, source_uri=source_uri,
                  source_identity=source_identity, observed_at=observed_at, updated_at=utc_now())
    storage.put_bytes(join_key(model, recipe, LATEST_NAME), (body.model_dump_json(indent=2) + "\n").encode())
    return True


class VerifyReport(BaseModel):
    """What `verify` found in one published version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    files: int
    bytes: int
    problems: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_version(
    storage: Storage,
    prefix: str = "",
    *,
    manifest_sha256: str | None = None,
    on_bytes: Callable[[int], None] | None = None,
    parallel: int = DEFAULT_VERIFY_PARALLEL,
) -> VerifyReport:
    """Re-hash every file the marker of `prefix` lists; check the manifest agrees with the marker.

    `parallel` files are hashed at once: object storage serves one stream at a fraction of a
    node's bandwidth, and a local disk's hashing is bound by one core per file. `on_bytes(n)` is
    called (from those threads) as bytes are hashed. `manifest_sha256` (from LATEST) is checked
    too when given. Problems are listed in file order, whatever order the hashing finished in.
    """
    problems: list[str] = []
    warnings: list[str] = []
    uri = storage.uri(prefix)
    try:
        files = _marker_files(storage, prefix)
    except ObjectNotFound:
        missing = f"{uri}: not published (no {DEFAULT_MARKER})"
        return VerifyReport(uri=uri, files=0, bytes=0, problems=(missing,))
    except (ValueError, json.JSONDecodeError) as error:
        return VerifyReport(uri=uri, files=0, bytes=0, problems=(f"{uri}: unreadable marker: {error}",))

    def check(key: str) -> tuple[str | None, int]:
        """(the problem or None, bytes hashed) of one listed file."""
        full = join_key(prefix, key)
        entry = files[key]
        want_size, want_sha = int(entry["size"]), str(entry["sha256"])  # type: ignore[call-overload]
        try:
            info = storage.stat(full)
        except ObjectNotFound:
            return f"{storage.uri(full)}: missing", 0
        if info.size != want_size:
            return f"{storage.uri(full)}: {info.size} bytes, published with {want_size}", 0
        sha = storage.hash_object(full, on_bytes=on_bytes)
        if sha != want_sha:
            return f"{storage.uri(full)}: SHA-256 {sha}, published with {want_sha}", info.size
        return None, info.size

    # Largest first, so a big shard does not start last and run alone at the end.
    order = sorted(files, key=lambda k: -int(files[k].get("size", 0)))  # type: ignore[call-overload]
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(order) or 1))) as pool:
        checked = dict(zip(order, pool.map(check, order), strict=True))
    total = sum(hashed for _, hashed in checked.values())
    problems += [problem for key in sorted(checked) if (problem := checked[key][0]) is not None]
    manifest_entry = files.get(MANIFEST_NAME)
    if not isinstance(manifest_entry, dict):
        problems.append(f"{uri}: the marker lists no {MANIFEST_NAME}")
    else:
        if manifest_sha256 is not None and manifest_entry.get("sha256") != manifest_sha256:
            problems.append(f"{storage.uri(join_key(prefix, MANIFEST_NAME))}: LATEST names SHA-256 "
                            f"{manifest_sha256}, the marker {manifest_entry.get('sha256')}")
        problems += _check_manifest(storage, prefix, files)
    listed = set(files) | {DEFAULT_MARKER}
    for info in storage.list(prefix + "/" if prefix else ""):
        rel = info.key[len(prefix) + 1:] if prefix else info.key
        if rel.startswith(".staging/") or rel in listed:
            continue
        warnings.append(f"{storage.uri(info.key)}: not part of the published version")
    return VerifyReport(uri=uri, files=len(files), bytes=total, problems=tuple(problems),
                        warnings=tuple(warnings))


def _check_manifest(storage: Storage, prefix: str, files: dict[str, dict[str, object]]) -> list[str]:
    """The shards the manifest names must be the ones the marker lists, with the same checksums."""
    key = join_key(prefix, MANIFEST_NAME)
    try:
        data = json.loads(storage.read_bytes(key))
    except ObjectNotFound:
        return []  # already reported as missing
    except json.JSONDecodeError as error:
        return [f"{storage.uri(key)}: not JSON: {error}"]
    problems = []
    for shard in data.get("shards", []):
        entry = files.get(shard["file"])
        if entry is None:
            problems.append(f"{storage.uri(key)}: names shard {shard['file']}, which was not published")
        elif entry.get("sha256") != shard["sha256"] or entry.get("size") != shard["size"]:
            problems.append(f"{storage.uri(key)}: shard {shard['file']} differs from the published one")
    return problems


def _published_prefixes(storage: Storage) -> Iterator[str]:
    suffix = "/" + DEFAULT_MARKER
    for info in storage.list(""):
        if info.key == DEFAULT_MARKER:
            yield ""
        elif info.key.endswith(suffix) and "/.staging/" not in f"/{info.key}":
            yield info.key[: -len(suffix)]


def published_versions(uri: str) -> list[tuple[Storage, str, str | None]]:
    """What `uri` names, as (storage, version prefix, the manifest SHA-256 LATEST names or None):
    a version (it holds the marker), a `<model>/<recipe>` prefix (the version its LATEST names),
    or any prefix (every published version under it).

    Raises ObjectNotFound when there is nothing published there.
    """
    storage = open_storage(uri)
    if is_published(storage, ""):
        return [(storage, "", None)]
    try:
        latest = Latest.model_validate_json(storage.read_bytes(LATEST_NAME))
    except ObjectNotFound:
        latest = None
    if latest is not None:
        return [(storage, latest.version, latest.manifest_sha256)]
    prefixes = list(_published_prefixes(storage))
    if not prefixes:
        raise ObjectNotFound(f"{storage.uri()}: no published version here (no {DEFAULT_MARKER}, no LATEST)")
    return [(storage, p, None) for p in prefixes]


def published_bytes(storage: Storage, prefix: str) -> int:
    """What verifying the version at `prefix` re-reads: the sizes its marker lists (0 if none)."""
    try:
        files = _marker_files(storage, prefix)
    except (ObjectNotFound, ValueError, json.JSONDecodeError):
        return 0
    return sum(int(entry.get("size", 0)) for entry in files.values())  # type: ignore[call-overload]


def verify_uri(uri: str, *, on_bytes: Callable[[int], None] | None = None,
               parallel: int = DEFAULT_VERIFY_PARALLEL) -> list[VerifyReport]:
    """Verify every version `published_versions(uri)` names (see `verify_version`)."""
    return [verify_version(storage, prefix, manifest_sha256=sha, on_bytes=on_bytes, parallel=parallel)
            for storage, prefix, sha in published_versions(uri)]
