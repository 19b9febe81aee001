"""Destination safety: refuse, before any work, a destination that is unsafe to publish into.

Without this check a destination that is the source, or that already holds the user's files, was
found out only at commit time, after the whole conversion (hours on a large model), and the
refusal then pointed at the user's own file. `check_destination` runs first in `convert`,
`demo`, `sweep` and `sync` (and in the flows they run, for callers that skip the CLI) and
refuses, in one line and having written nothing:

- a destination that is the source, contains it, or lies inside it where its files would be
  read back as source: every non-hidden file of a checkpoint folder is read (weights at its top
  level or where the index says, everything else copied as side files), and `sync` scans every
  non-hidden folder of its source for checkpoints. Hidden folders are never read, so a
  destination inside one is allowed. Local paths are compared after resolving symlinks and
  `..` (and by device and inode, which also catches bind mounts); S3 URIs by bucket and
  '/'-separated prefix segments.
- a destination holding files quantfleet did not write, named (a few) and counted;
- a local destination this user cannot create files in (a read-only filesystem, no write
  permission, a file where a folder of its path should be): every unit met it at its first write.

What quantfleet writes, and so accepts in a destination, at any depth (a `convert` or `demo`
destination is one version, `sweep` writes `OUT/<SCHEME>/` versions beside its `sweep.*` files,
`sync` writes `<model>/<recipe>/<version>/` and `<model>/<recipe>/LATEST`):

- published versions: a folder's `_QUANTFLEET_PUBLISHED.json` marker and the files it lists
  (with the sizes it lists);
- staging areas `<folder>/.staging/<staging id>/...` of interrupted or gate-failed runs, so a re-run
  resumes; and files an interrupted commit already copied out of one (same name and size as a
  staged file beside them);
- `LATEST` pointers that parse as such, and a sweep's `sweep.json` (when it parses as a sweep
  result) with the other `sweep.*` files beside it.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from infra.errors import ObjectNotFound
from infra.publish import DEFAULT_MARKER
from infra.storage import LocalStorage, Storage, StorageURI, open_storage, parse_uri
from infra.storage.local import TEMP_PREFIX, nearest_existing

__all__ = ["DestinationRefused", "SourceKind", "check_destination", "foreign_files", "overlap"]

SourceKind = Literal["checkpoint", "tree"]
Relation = Literal["same", "contains", "inside"]

_STAGING = ".staging"
_PLAN_ID = re.compile(r"[0-9a-f]{16}")
_SHOWN = 3  # foreign files named in the message; the rest are counted
_READERS = 8  # concurrent reads of markers and pointers (one request each on S3)


class DestinationRefused(Exception):
    """The destination overlaps the source or holds files quantfleet did not write; nothing was done."""


def _segments(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _relation(source: tuple[str, ...], dest: tuple[str, ...]) -> tuple[Relation, tuple[str, ...]] | None:
    """How two paths (as segments) overlap, with the destination's segments below the source."""
    if source == dest:
        return "same", ()
    if source[: len(dest)] == dest:
        return "contains", ()
    if dest[: len(source)] == source:
        return "inside", dest[len(source) :]
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _local_relation(source: Path, dest: Path) -> tuple[Relation, tuple[str, ...]] | None:
    found = _relation(source.parts, dest.parts)
    if found is not None:
        return found
    # The same folder under two names that do not resolve to one path (a bind mount): compare
    # the existing folders on each side by device and inode.
    src_id, dst_id = _identity(source), _identity(dest)
    for above in (dest, *dest.parents):
        if src_id is not None and _identity(above) == src_id:
            below = dest.relative_to(above).parts
            return ("inside", below) if below else ("same", ())
    for above in source.parents:
        if dst_id is not None and _identity(above) == dst_id:
            return "contains", ()
    return None


def overlap(source: StorageURI, dest: StorageURI) -> tuple[Relation, tuple[str, ...]] | None:
    """How `dest` overlaps `source`: "same", "contains" (the source) or "inside" (it, with the
    destination's path segments below the source), or None when they are apart."""
    if source.scheme != dest.scheme:
        return None
    if source.scheme == "s3":
        if source.bucket != dest.bucket:
            return None
        return _relation(_segments(source.path), _segments(dest.path))
    return _local_relation(Path(source.path), Path(dest.path))


def _overlap_message(
    relation: Relation, below: tuple[str, ...], source: str, dest: str, kind: SourceKind
) -> str | None:
    if relation == "same":
        what = "source folder" if kind == "tree" else "source checkpoint"
        return (f"{dest}: the destination is the {what}; quantfleet never writes where it reads: "
                "choose another destination")
    if relation == "contains":
        return (f"{dest}: the destination contains the source {source}, so the result would be "
                "published among the source's files: choose a destination outside it")
    if any(part.startswith(".") for part in below):
        return None  # hidden folders are never read as source: not weights, side files or checkpoints
    if kind == "tree":
        why = "every folder of which is scanned for checkpoints to convert"
    else:
        why = ("every file of which is read as part of the checkpoint (weights, and the rest copied "
               "into the result as side files)")
    return (f"{dest}: the destination lies inside the source {source}, {why}, so the result would be "
            "read back as source: choose a destination outside it (or in a hidden folder, which is "
            "never read)")


def _folder(key: str) -> str:
    return key.rpartition("/")[0]


def _staged(key: str) -> tuple[str, str] | None:
    """(the folder staged for, the key relative to it) when `key` is in a staging area of ours."""
    if _STAGING + "/" not in key:
        return None  # the common case, answered without splitting the key
    parts = key.split("/")
    for i, part in enumerate(parts[:-2]):
        if part == _STAGING and _PLAN_ID.fullmatch(parts[i + 1]):
            return "/".join(parts[:i]), "/".join(parts[i + 2 :])
    return None


def _read_json(storage: Storage, key: str) -> object:
    try:
        return json.loads(storage.read_bytes(key))
    except (ObjectNotFound, ValueError):
        return None


def _is_latest(storage: Storage, key: str) -> bool:
    from flows.versions import Latest  # lazily: it imports the conversion's modules (torch)

    try:
        Latest.model_validate_json(storage.read_bytes(key))
    except (ObjectNotFound, ValidationError, ValueError):
        return False
    return True


def _is_sweep(storage: Storage, key: str) -> bool:
    from flows.sweep import SweepResult  # lazily: flows.sweep calls this module

    try:
        SweepResult.model_validate_json(storage.read_bytes(key))
    except (ObjectNotFound, ValidationError, ValueError):
        return False
    return True


def _local_objects(root: Path) -> dict[str, int | None]:
    """Every file under `root` ('/'-separated keys), sizes left to look up when needed.

    A plain walk, without the stat per file `LocalStorage.list` makes: a destination refused for
    holding a home folder's 200,000 files is refused in seconds, not minutes.
    """
    found: dict[str, int | None] = {}
    top = str(root)
    cut = len(top.rstrip(os.sep)) + 1  # dirpath[cut:] is the folder's path below the root
    for dirpath, _dirs, filenames in os.walk(top):
        folder = dirpath[cut:].replace(os.sep, "/") if dirpath != top else ""
        for name in filenames:
            if not name.startswith(TEMP_PREFIX):  # an unfinished write of ours, not an object
                found[f"{folder}/{name}" if folder else name] = None
    return found


def foreign_files(storage: Storage) -> list[str]:
    """The keys under `storage` that quantfleet did not write (see the module docstring), sorted."""
    if isinstance(storage, LocalStorage):
        objects = _local_objects(storage.root) if storage.root.is_dir() else {}
    else:
        objects = {info.key: info.size for info in storage.list("")}
    if not objects:
        return []
    # Imported here: they import the conversion's modules (torch), which an empty destination,
    # the usual case, does not need before the conversion itself imports them.
    from flows.sweep import SWEEP_FILES
    from flows.versions import LATEST_NAME

    def size(key: str) -> int:
        known = objects[key]
        if known is None:
            try:
                known = objects[key] = storage.stat(key).size
            except ObjectNotFound:
                known = -1  # gone since the listing (or a dangling link): never matches a record
        return known

    staged: dict[tuple[str, str], list[str]] = {}
    for key in objects:
        where = _staged(key)
        if where is not None:
            staged.setdefault(where, []).append(key)
    markers = [k for k in objects if k.rpartition("/")[2] == DEFAULT_MARKER and _staged(k) is None]
    latest = [k for k in objects if k.rpartition("/")[2] == LATEST_NAME]
    sweeps = [k for k in objects if k.rpartition("/")[2] == "sweep.json"]
    with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="destination") as pool:
        marker_bodies = dict(zip(markers, pool.map(lambda k: _read_json(storage, k), markers), strict=True))
        latest_ok = list(pool.map(lambda k: _is_latest(storage, k), latest))
        sweep_ok = list(pool.map(lambda k: _is_sweep(storage, k), sweeps))
    good_latest = {k for k, ok in zip(latest, latest_ok, strict=True) if ok}
    sweep_folders = {_folder(k) for k, ok in zip(sweeps, sweep_ok, strict=True) if ok}
    published: dict[str, dict[str, object]] = {}
    for key, body in marker_bodies.items():
        files = body.get("files") if isinstance(body, dict) else None
        if isinstance(files, dict):
            published[_folder(key)] = files
    anchors = set(published) | {folder for folder, _ in staged}  # folders that can vouch for files

    def ours(key: str) -> bool:
        if _staged(key) is not None or key in good_latest:
            return True
        if key.rpartition("/")[2] in SWEEP_FILES and _folder(key) in sweep_folders:
            return True
        folder = key
        while anchors:  # every folder above the key, deepest first, up to the destination itself
            folder = _folder(folder)
            rel = key[len(folder) + 1 :] if folder else key
            files = published.get(folder)
            if files is not None:
                entry = files.get(rel)
                if rel == DEFAULT_MARKER or (isinstance(entry, dict) and entry.get("size") == size(key)):
                    return True
            if any(size(copy) == size(key) for copy in staged.get((folder, rel), ())):
                return True  # copied out of a staging area by an interrupted commit
            if not folder:
                break
        return False

    return sorted(key for key in objects if not ours(key))


def _unwritable(path: str) -> str | None:
    """Why this user cannot create files at the local `path` (or, before it exists, in its nearest
    existing folder), or None: found now, not by every unit's first write after start-up."""
    folder = nearest_existing(Path(path))
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return f"{folder} is on a read-only filesystem" if read_only else f"this user may not write in {folder}"


def check_destination(
    source_uri: str, dest_uri: str, *, source_kind: SourceKind = "checkpoint", contents: bool = True
) -> None:
    """Raise DestinationRefused (one line) when publishing `source_uri`'s conversion at `dest_uri`
    is unsafe: the two overlap, or the destination holds files quantfleet did not write.

    `source_kind` is "checkpoint" for one checkpoint folder (`convert`, `demo`, `sweep`) and
    "tree" for a folder scanned for checkpoints (`sync`). Reads listings and a few small files;
    creates nothing. `contents=False` checks the overlap alone (no I/O): for a schedule registered
    here and run by workers elsewhere, with their own credentials, each run checks the contents.
    """
    dest = parse_uri(dest_uri)
    # A synthetic source (benchmarks, tests) is made up on read and stores nothing to overlap.
    if not source_uri.lower().startswith("synthetic://"):
        source = parse_uri(source_uri)
        found = overlap(source, dest)
        if found is not None:
            message = _overlap_message(found[0], found[1], str(source), str(dest), source_kind)
            if message is not None:
                raise DestinationRefused(message)
    if not contents:
        return
    if dest.scheme == "file" and os.path.lexists(dest.path) and not os.path.isdir(dest.path):
        raise DestinationRefused(f"{dest}: is a file, not a folder: choose a folder to publish into")
    unwritable = _unwritable(dest.path) if dest.scheme == "file" else None
    if unwritable is not None:
        raise DestinationRefused(f"{dest}: cannot publish there: {unwritable}; choose another destination")
    foreign = foreign_files(open_storage(str(dest)))
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN
                                               else "")
        raise DestinationRefused(
            f"{dest}: holds {len(foreign)} file(s) quantfleet did not write ({shown}); quantfleet "
            "publishes only into an empty folder or prefix, or one holding its own earlier output "
            "(published versions, staging of an interrupted run): choose another destination"
        )
