"""A new version whose shards a published version already holds: stage those, convert nothing.

`sync` publishes a new version when a side file the model loads with changes (a chat template
or an end-of-turn token fixed days after a release) even though the weights did not. The plan's
staging id covers everything that decides the shards' bytes (the weight files, the recipe less
its gates, the tool version, the shard size, a budget's assignment); when the published version
records the same one, its shards are those bytes. They are copied into the new version's
staging with their unit records, as an interrupted run would have left them, so every unit
counts as done (and is checked against its record as any resumed unit is) and the version is
finished as usual: side files, config, report, evaluation and gates made anew. Copies are
server-side on S3 and hard links on a local disk.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

from flows.plan import Plan
from flows.versions import MANIFEST_NAME
from infra.errors import InfraError, StorageError
from infra.publish import staging_prefix
from infra.safetensors import INDEX_NAME, read_header, read_index
from infra.storage import Storage, join_key
from workers.convert_unit import unit_record_key
from workers.records import TensorRecord, UnitResult
from workers.units import WorkUnit

__all__ = ["stage_published_shards"]

_log = logging.getLogger(__name__)
_COPIES_IN_FLIGHT = 16


def stage_published_shards(plan: Plan, storage: Storage, published: str, version: str) -> int:
    """Stage in `version` (a key prefix of `storage`) the shards of the version published at
    `published` when that one was made with `plan`'s staging id; returns the units staged (0:
    other shards, or a manifest that cannot say, and nothing was staged). A shard that cannot be
    read there (deleted, damaged) is left to convert."""
    try:
        manifest = json.loads(storage.read_bytes(join_key(published, MANIFEST_NAME)))
    except (StorageError, ValueError):
        return 0
    if not isinstance(manifest, dict) or manifest.get("staging_id") != plan.staging_id:
        return 0
    shards = {s["file"]: s for s in manifest.get("shards", ())}
    runs = {u["file"]: u for u in manifest.get("units", ())}
    tensors = {t["name"]: t for t in manifest.get("tensors", ())}
    wanted = [u for u in plan.units if u.file_name in shards and u.file_name in runs]
    if len(wanted) != len(plan.units) or any(j.name not in tensors for u in wanted for j in u.jobs):
        return 0
    staging = staging_prefix(version, plan.staging_id)
    weight_maps = _weight_maps(storage, published)

    def stage(unit: WorkUnit) -> bool:
        shard, run = shards[unit.file_name], runs[unit.file_name]
        source_key = join_key(published, unit.file_name)
        try:
            weight_map = weight_maps.get(unit.file_name) or {
                t.name: unit.file_name for t in read_header(storage, source_key).tensors}
            record = UnitResult(
                index=unit.index, file_name=unit.file_name, size=shard["size"], sha256=shard["sha256"],
                tensors=tuple(TensorRecord.model_validate(tensors[j.name]) for j in unit.jobs),
                weight_map=weight_map, seconds=run["seconds"], device=run["device"], node=run["node"],
            )
            storage.copy(source_key, join_key(staging, unit.file_name))
        except (InfraError, ValueError) as error:  # a shard gone or damaged there: this unit converts
            _log.warning("%s: not staged from %s (%s); it is converted", unit.file_name,
                         storage.uri(published), error)
            return False
        storage.put_bytes(join_key(staging, unit_record_key(unit)), record.model_dump_json().encode())
        return True

    # One copy per shard, several in flight: a 1T model has thousands of shards, and each copy
    # (server-side on S3) waits on the store, not on this machine.
    with ThreadPoolExecutor(max(1, min(_COPIES_IN_FLIGHT, len(wanted)))) as pool:
        staged = sum(pool.map(stage, wanted))
    _log.info("%s: %d of %d shard(s) staged from %s (same weights, recipe and tool version)",
              storage.uri(version), staged, len(wanted), storage.uri(published))
    return staged


def _weight_maps(storage: Storage, published: str) -> dict[str, dict[str, str]]:
    """{shard file: its part of the published index's weight map}, read once for every shard;
    empty when there is no index (a one-shard checkpoint: its header says)."""
    try:
        weight_map, _ = read_index(storage, join_key(published, INDEX_NAME))
    except InfraError:
        return {}
    by_file: dict[str, dict[str, str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, {})[name] = file_name
    return by_file
