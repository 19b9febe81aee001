"""Room at the destination: refuse, before any work, a conversion its filesystem cannot hold.

Shards are written as units finish, so a destination too small for the result was found out only
when its disk filled: on a large model hours in, at the first unit that no longer fit, with every
unit still queued behind it run to the same failure. `check_free_space` runs after planning, in
`convert` and every flow that converts (before Ray starts, in the CLI), and refuses in one line
when what the plan still has to write does not fit in what the destination's filesystem leaves
this user, with a margin:

- what it writes: every unit's shard (the plan knows its tensors' bytes exactly; the headers, at
  most a few hundred bytes per tensor, fall in the margin for records and reports),
  the GGUF of a both-formats recipe, and the side files copied from the source (tokenizer,
  config); less the shards of the units an interrupted run of the same plan finished, which a
  re-run keeps.
- publishing adds nothing: a local commit hard-links the staged files into place.

The refusal names what other runs (another recipe, a failed gate) left staged there, with its
size: on a large model that alone can be the missing room. A commit removes it (`infra.publish`).

Object storage has no such limit (`Storage.free_bytes` is None) and is not checked. Nor are the
workers' scratch folders, where the shards of an S3 destination are assembled (one per running
unit, on each node's own disk): a disk that fills there, or one that another process fills during
the run, stops the run at the unit that met it (`workers.errors.OutOfSpace`; a destination that
turns read-only or stops accepting the credentials does the same, `DestinationUnwritable`).
"""

from __future__ import annotations

from flows.destination import DestinationRefused
from flows.gguf_output.companion import GGUF_FOLDER
from flows.plan import Plan
from infra.errors import ObjectNotFound
from infra.publish import staging_root
from infra.sizes import format_size
from infra.storage import Storage, join_key, open_storage
from workers.convert_unit import unit_record_key

__all__ = ["HEADROOM_BYTES", "HEADROOM_PER_TENSOR", "InsufficientSpace", "bytes_to_write", "check_free_space"]

# Besides the shards: the unit records, the report, the manifest and the marker (each grows with
# the tensors: ~0.3 KiB each in the records), the chart, and room for the filesystem's own.
HEADROOM_BYTES = 16 << 20
HEADROOM_PER_TENSOR = 1 << 10


class InsufficientSpace(DestinationRefused):
    """The destination's filesystem cannot hold what the conversion writes; nothing was done."""


def _side_file_bytes(plan: Plan) -> int:
    source = open_storage(plan.source_uri)
    total = 0
    for key in plan.side_files:
        try:
            total += source.stat(key).size
        except ObjectNotFound:
            continue  # planning listed it; a file gone since fails where it is copied
    return total


def _staged_bytes(plan: Plan, dest: Storage) -> int:
    """The shards of units an interrupted run finished (their records staged beside them): what a
    re-run does not write again."""
    staging = plan.publisher(dest).staging
    listed = {info.key: info.size for info in dest.list(staging + "/")}
    done = 0
    for half, prefix in ((plan, staging), (plan.gguf, join_key(staging, GGUF_FOLDER))):
        for unit in half.units if half is not None else ():
            finished = (join_key(prefix, unit_record_key(unit)), join_key(prefix, unit.file_name))
            if all(key in listed for key in finished):
                done += unit.bytes_out
    return done


def _other_runs_staged(plan: Plan, dest: Storage) -> dict[str, int]:
    """Bytes staged at `dest` by other runs (another recipe, a failed gate), by staging folder."""
    root = staging_root("")
    ours = plan.publisher(dest).staging + "/"
    held: dict[str, int] = {}
    for info in dest.list(root + "/"):
        if not info.key.startswith(ours):
            folder = join_key(root, info.key[len(root) + 1 :].partition("/")[0])
            held[folder] = held.get(folder, 0) + info.size
    return held


def bytes_to_write(plan: Plan, dest: Storage) -> int:
    """What publishing `plan` at `dest` still writes there: shards (both formats' when the recipe
    asks for two) and side files, less the shards of units an interrupted run of this plan
    finished."""
    total = plan.bytes_out + (plan.gguf.bytes_out if plan.gguf is not None else 0)
    total += _side_file_bytes(plan)
    return max(total - _staged_bytes(plan, dest), 0)


def check_free_space(plan: Plan, dest_uri: str) -> None:
    """Raise InsufficientSpace (one line) when `dest_uri` is on a filesystem without room for
    what `plan` still writes there (see the module docstring); creates nothing."""
    dest = open_storage(dest_uri)
    free = dest.free_bytes()
    if free is None:
        return
    needed = bytes_to_write(plan, dest)
    tensors = sum(len(unit.jobs) for unit in plan.units)
    with_records = needed + HEADROOM_BYTES + HEADROOM_PER_TENSOR * tensors
    if with_records <= free:
        return
    others = _other_runs_staged(plan, dest)
    # A result staged by an earlier run of another plan is a likely reason on a large model: name it.
    held = (f" (the staging of {len(others)} other run(s) there holds {format_size(sum(others.values()))}: "
            f"{', '.join(dest.uri(k) for k in sorted(others))}; delete it if you will not resume that run)"
            if others else "")
    raise InsufficientSpace(
        f"{dest.uri()}: this conversion writes {format_size(needed)} there "
        f"({format_size(with_records)} with its records and report), but its filesystem has "
        f"{format_size(free)} free; free {format_size(with_records - free)} more{held} or choose another "
        "destination"
    )
