"""Catalog of a checkpoint folder: which tensor lives in which file, from the headers alone.

With `model.safetensors.index.json` the index decides which files belong to the checkpoint (other
*.safetensors files, e.g. Mistral's `consolidated.safetensors`, are ignored) and is cross-checked
against the headers; without it every top-level *.safetensors file is read, and files named as
transformers numbers shards (`model-00001-of-00004.safetensors`) must all be there. Headers are
read concurrently. Pickle weights are never loaded.
"""

from __future__ import annotations

import json
import re
import reprlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from infra.errors import CatalogError, InvalidURI, MissingShardError, ObjectNotFound, PickleWeightsError
from infra.safetensors.header import SafetensorsHeader, TensorInfo, read_header
from infra.storage.base import ObjectInfo, Storage, check_key, join_key

__all__ = [
    "INDEX_NAME",
    "read_index",
    "PICKLE_SUFFIXES",
    "Catalog",
    "CatalogEntry",
    "build_catalog",
    "read_model_config",
]

INDEX_NAME = "model.safetensors.index.json"
# config.json keys read before any per-format code, and the JSON type each must have when present
# (planning branches on them; a wrong type would surface as an AttributeError deep inside).
_CONFIG_TYPES: dict[str, tuple[type, str]] = {
    "model_type": (str, "a string"),
    "architectures": (list, "a list of class names"),
    "quantization_config": (dict, "an object"),
    "torch_dtype": (str, "a string"),
    "dtype": (str, "a string"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# transformers' (and most tools') names for the shards of one checkpoint: part and count.
_NUMBERED_SHARD = re.compile(r"(?P<stem>.+)-(?P<part>\d+)-of-(?P<count>\d+)\.safetensors")


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """Where one tensor lives: the file's storage key and the tensor's header record."""

    file: str
    info: TensorInfo


class Catalog(BaseModel):
    """Every tensor of a checkpoint, its shard files' headers, and the non-weight side files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    files: dict[str, SafetensorsHeader]  # storage key -> validated header
    tensors: dict[str, CatalogEntry]  # tensor name -> location
    side_files: tuple[str, ...]  # storage keys of config.json, tokenizer*, ... (top level)
    index_metadata: dict[str, Any] | None = None
    # top-level *.safetensors files the index does not name (Mistral's consolidated.safetensors, a
    # stray copy): never read, so planning can say they are left out
    unlisted_files: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(e.info.nbytes for e in self.tensors.values())


def _below(prefix: str, objects: list[ObjectInfo]) -> list[str]:
    """Each object's key relative to the folder `prefix`."""
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return [o.key[len(base) :] for o in objects]


def _name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _read_json(storage: Storage, key: str) -> Any:
    try:
        return json.loads(storage.read_bytes(key))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        raise CatalogError(f"{storage.uri(key)}: not valid JSON ({exc})") from exc


def read_model_config(storage: Storage) -> dict[str, Any] | None:
    """The checkpoint's `config.json` as a dict, or None when it has none.

    A config that is not a JSON object, or whose common keys have the wrong type, is the user's
    file to fix: one line naming it and the key.
    """
    key = "config.json"
    if not storage.exists(key):
        return None
    config = _read_json(storage, key)
    if not isinstance(config, dict):
        raise CatalogError(f"{storage.uri(key)}: must hold a JSON object, not {type(config).__name__}")
    for name, (kind, described) in _CONFIG_TYPES.items():
        value = config.get(name)
        if value is not None and not isinstance(value, kind):
            raise CatalogError(f"{storage.uri(key)}: {name!r} must be {described}, not {reprlib.repr(value)}")
    return config


def read_index(storage: Storage, key: str) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The weight map ({tensor: file name}) and metadata of the index at `key`; CatalogError when
    it is not JSON or its weight map is not names to names (ObjectNotFound when it is missing)."""
    uri = storage.uri(key)
    obj = _read_json(storage, key)
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CatalogError(f"{uri}: 'weight_map' must map tensor names to file names")
    meta = obj.get("metadata")
    return weight_map, meta if isinstance(meta, dict) else None


def _read_headers(
    storage: Storage, objects: list[ObjectInfo], max_workers: int
) -> dict[str, SafetensorsHeader]:
    def one(o: ObjectInfo) -> SafetensorsHeader:
        return read_header(storage, o.key, file_size=o.size)

    with ThreadPoolExecutor(max(1, min(max_workers, len(objects)))) as pool:
        headers = list(pool.map(one, objects))
    return {o.key: h for o, h in zip(objects, headers, strict=True)}


def _collect_tensors(headers: dict[str, SafetensorsHeader]) -> dict[str, CatalogEntry]:
    tensors: dict[str, CatalogEntry] = {}
    for key in sorted(headers):
        for info in headers[key].tensors:
            if info.name in tensors:
                other = tensors[info.name].file
                raise CatalogError(
                    f"{headers[key].uri}: tensor {info.name!r} is also in {other!r}; "
                    "a tensor must live in exactly one file"
                )
            tensors[info.name] = CatalogEntry(file=key, info=info)
    return tensors


def _check_against_index(
    storage: Storage,
    index_key: str,
    weight_map: dict[str, str],
    tensors: dict[str, CatalogEntry],
    prefix: str,
) -> None:
    uri = storage.uri(index_key)
    for name, file_name in sorted(weight_map.items()):
        entry = tensors.get(name)
        if entry is None:
            raise CatalogError(
                f"{uri}: tensor {name!r} is mapped to {file_name!r}, which does not contain it"
            )
        if entry.file != join_key(prefix, file_name):
            raise CatalogError(
                f"{uri}: tensor {name!r} is mapped to {file_name!r} but found in {_name(entry.file)!r}"
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise CatalogError(f"{uri}: tensors {extra[:5]} are in the shards but not in the index weight_map")


def _index_files(
    storage: Storage, prefix: str, index_key: str, weight_map: dict[str, str]
) -> list[ObjectInfo]:
    objects: list[ObjectInfo] = []
    for file_name in sorted(set(weight_map.values())):
        try:
            key = check_key(join_key(prefix, file_name))
        except InvalidURI as exc:
            raise CatalogError(f"{storage.uri(index_key)}: bad file name {file_name!r}") from exc
        try:
            objects.append(storage.stat(key))
        except ObjectNotFound as exc:
            raise MissingShardError(
                f"{storage.uri(index_key)}: names shard {file_name!r}, which is missing ({storage.uri(key)})"
            ) from exc
    return objects


def build_catalog(storage: Storage, prefix: str = "", *, max_workers: int = 8) -> Catalog:
    """Catalog the checkpoint under `prefix` of `storage` (headers only, no tensor data)."""
    prefix = prefix.strip("/")
    everything = list(storage.list(f"{prefix}/" if prefix else ""))
    below = _below(prefix, everything)
    top = [o for o, key in zip(everything, below, strict=True) if "/" not in key]
    by_name = {_name(o.key): o for o in top}
    weights = [o for o in top if o.key.endswith(".safetensors")]
    index_key = join_key(prefix, INDEX_NAME)
    weight_map, index_meta = None, None
    if INDEX_NAME in by_name:
        weight_map, index_meta = read_index(storage, index_key)
        weights = _index_files(storage, prefix, index_key, weight_map)
    if not weights:
        _raise_no_weights(storage, prefix, top, below)
    if weight_map is None:
        _check_numbered_shards(storage, prefix, weights)
    headers = _read_headers(storage, weights, max_workers)
    tensors = _collect_tensors(headers)
    unlisted: tuple[str, ...] = ()
    if weight_map is not None:
        _check_against_index(storage, index_key, weight_map, tensors, prefix)
        listed = {o.key for o in weights}
        unlisted = tuple(o.key for o in top if o.key.endswith(".safetensors") and o.key not in listed)
    side = tuple(
        o.key
        for o in top
        if not o.key.endswith(".safetensors")
        and not o.key.endswith(PICKLE_SUFFIXES)
        and _name(o.key) != INDEX_NAME
        and not _name(o.key).startswith(".")
    )
    # Every part was validated as it was read; re-validating a million records would cost seconds.
    return Catalog.model_construct(
        uri=storage.uri(prefix),
        files=headers,
        tensors=tensors,
        side_files=side,
        index_metadata=index_meta,
        unlisted_files=unlisted,
    )


def _check_numbered_shards(storage: Storage, prefix: str, weights: list[ObjectInfo]) -> None:
    """Refuse a checkpoint without an index whose numbered shards are not all there: a checkpoint
    still uploading (the index often comes last) or copied in part would otherwise convert as a
    smaller model, without the layers of its missing files."""
    present: dict[tuple[str, str], set[int]] = {}
    widths: dict[tuple[str, str], int] = {}  # DeepSeek-V3 numbers 00001-of-000163: the part's own
    for o in weights:
        match = _NUMBERED_SHARD.fullmatch(_name(o.key))
        if match is not None:
            present.setdefault((match["stem"], match["count"]), set()).add(int(match["part"]))
            widths[match["stem"], match["count"]] = len(match["part"])
    for (stem, count), parts in sorted(present.items()):
        width = widths[stem, count]
        missing = [f"{stem}-{part:0{width}d}-of-{count}.safetensors"
                   for part in range(1, int(count) + 1) if part not in parts]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise MissingShardError(
                f"{storage.uri(prefix)}: {len(missing)} of {int(count)} shards are missing ({shown}), and "
                f"there is no {INDEX_NAME}: the checkpoint is incomplete (still uploading, or copied in part)"
            )


def _raise_no_weights(storage: Storage, prefix: str, top: list[ObjectInfo], below: list[str]) -> None:
    """One line saying why there is no checkpoint here, and where one is when it is in a folder
    below (the folder of a Hugging Face cache's repository, a repository keeping its weights in a
    subfolder)."""
    uri = storage.uri(prefix)
    pickles = sorted(_name(o.key) for o in top if o.key.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise PickleWeightsError(
            f"{uri}: only pickle weights found ({', '.join(pickles[:5])}); quantfleet never "
            "unpickles files (they can run code). Convert them to safetensors first, e.g. in a "
            "trusted environment: safetensors.torch.save_file(torch.load(path, weights_only=True), "
            "'model.safetensors')"
        )
    # Hidden folders (a staging area, a destination kept inside the source) are never read.
    below = [key for key in below if not any(part.startswith(".") for part in key.split("/")[:-1])]
    folders = sorted({key.split("/", 1)[0] for key in below if "/" in key})
    if not top and {"blobs", "snapshots"} <= set(folders):
        raise CatalogError(_hugging_face_cache_message(storage, prefix, below))
    if not below:
        raise CatalogError(f"{uri}: nothing there (no such folder, or an empty one)")
    holders = sorted({key.rsplit("/", 1)[0] for key in below if "/" in key and key.endswith(".safetensors")})
    shown = ", ".join(f"{uri}/{holder}" for holder in holders[:3]) + (
        f" and {len(holders) - 3} more" if len(holders) > 3 else "")
    what = f"no *.safetensors files and no {INDEX_NAME}" if top else "no files at its top level, only folders"
    if holders:
        raise CatalogError(f"{uri}: {what}; *.safetensors files are in {shown}: name the folder that holds "
                           "the checkpoint")
    if not top:
        raise CatalogError(f"{uri}: {what} ({', '.join(folders[:5])}), and no *.safetensors files in them")
    raise CatalogError(f"{uri}: {what}")


def _hugging_face_cache_message(storage: Storage, prefix: str, below: list[str]) -> str:
    uri = storage.uri(prefix)
    revisions = sorted({key.split("/")[1] for key in below
                        if key.startswith("snapshots/") and key.count("/") >= 2})
    main = None
    if "refs/main" in below:
        main = storage.read_bytes(join_key(prefix, "refs/main")).decode(errors="replace").strip()
    chosen = main if main in revisions else (revisions[0] if len(revisions) == 1 else None)
    if chosen is not None:
        where = f"{uri}/snapshots/{chosen}" + (" (the revision refs/main names)" if chosen == main else "")
    elif revisions:
        where = "one of its snapshots: " + ", ".join(f"{uri}/snapshots/{rev}" for rev in revisions[:3]) + (
            f" and {len(revisions) - 3} more" if len(revisions) > 3 else "")
    else:
        where = "a snapshot, once one is downloaded (it has none)"
    return f"{uri}: a Hugging Face cache folder (blobs, refs, snapshots), not a checkpoint: name {where}"
