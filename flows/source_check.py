"""A conversion publishes only what it made from the source it planned.

The plan records each source shard file's size and version tag as planning saw them (on S3 the
object's ETag; on local disk an ETag of inode, modification time and size). A file replaced or
rewritten while the conversion ran (an upload landing again under the same key, a copy over the
file) leaves a result made partly from one version and partly from the other, under the first
one's identity. So before committing, the files are looked at again: if any changed, nothing is
published, this plan's staging area is deleted (a re-run plans the new version under a new plan
id, so none of it could be reused, and none of it can be trusted), and the error names the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from flows.plan import Plan
from flows.sources import SourceError
from infra.errors import ObjectNotFound
from infra.sizes import format_size
from infra.storage import Storage, open_storage

__all__ = ["SourceChanged", "check_source_unchanged", "file_tags", "with_source_files"]

# HEAD requests in flight when looking at a source's files (a 1T-parameter checkpoint has ~1000).
_STAT_THREADS = 16

FileTag = tuple[int, str | None]  # size, and ETag or SHA-256
T = TypeVar("T")


class SourceChanged(SourceError):
    """A source file changed between planning and publishing."""


def file_tags(storage: Storage, keys: Iterable[str]) -> dict[str, FileTag]:
    """{key: (size, ETag or SHA-256)} of each file, as the plan's identity hashes them."""
    return _for_each(keys, lambda key: _tag(storage, key))


def _tag(storage: Storage, key: str) -> FileTag:
    info = storage.stat(key)
    return info.size, info.etag or info.sha256


def _for_each(keys: Iterable[str], look: Callable[[str], T]) -> dict[str, T]:
    """{key: look(key)}, `_STAT_THREADS` requests in flight."""
    ordered = list(keys)
    with ThreadPoolExecutor(min(_STAT_THREADS, max(1, len(ordered)))) as pool:
        return dict(zip(ordered, pool.map(look, ordered), strict=True))


def with_source_files(plan: Plan, tags: dict[str, FileTag]) -> Plan:
    """`plan` recording the source files' tags it was planned from (what publishing checks)."""
    return plan.model_copy(update={"source_files": tuple((key, *tags[key]) for key in sorted(tags))})


def check_source_unchanged(plan: Plan, discard: Storage, staging: str) -> None:
    """Raise SourceChanged, after deleting `staging` in `discard`, if any source file's size or
    tag is not what the plan recorded."""
    if not plan.source_files:
        return
    source = open_storage(plan.source_uri)
    planned = {key: (size, tag) for key, size, tag in plan.source_files}

    def now(key: str) -> FileTag | None:
        try:
            return _tag(source, key)
        except ObjectNotFound:
            return None

    current = _for_each(planned, now)
    changed = sorted(key for key in planned if current[key] != planned[key])
    if not changed:
        return
    discard.delete_prefix(staging)
    key = changed[0]
    more = f" (and {len(changed) - 1} more file(s))" if len(changed) > 1 else ""
    raise SourceChanged(
        f"{source.uri(key)}: changed while it was being converted ({_describe(planned[key])} when "
        f"planned, {_describe(current[key])} now){more}; nothing was published and the results made "
        f"from it were deleted; run the same command again to convert the source as it is now"
    )


def _describe(tag: FileTag | None) -> str:
    if tag is None:
        return "gone"
    size, version = tag
    return f"{format_size(size)}, version {version}" if version else format_size(size)
