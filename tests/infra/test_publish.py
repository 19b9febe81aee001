"""Publishing is a commit: verified, marker last, never overwritten, nothing visible on failure."""

from __future__ import annotations

import hashlib
import json

import pytest

from infra.errors import AccessDenied, AlreadyExists, CommitRefused
from infra.publish import DEFAULT_MARKER, Expected, Publisher, commit, is_published
from infra.storage import LocalStorage, S3Storage, Storage
from infra.storage.parts import MiB

from .conftest import make_s3_storage
from .fault_proxy import FaultProxy

SHARD = bytes(range(256)) * (24 * 1024)  # 6 MiB: multipart on S3


def _visible(storage: Storage, prefix: str) -> list[str]:
    """What a consumer listing the destination sees (staging excluded)."""
    return [o.key for o in storage.list(prefix + "/") if "/.staging/" not in o.key]


def _stage(pub: Publisher) -> None:
    with pub.stage_writer("model.safetensors", size_hint=len(SHARD)) as w:
        w.write(SHARD)
        pub.record("model.safetensors", w.close())
    pub.stage_bytes("config.json", b'{"model_type": "llama"}')


def test_stage_then_commit(storage: Storage) -> None:
    pub = Publisher(storage, "out/v1", run_id="run-1")
    _stage(pub)
    assert not pub.is_published()
    assert _visible(storage, "out/v1") == []  # nothing where consumers look
    marker = pub.commit()
    assert marker.key == f"out/v1/{DEFAULT_MARKER}"
    assert is_published(storage, "out/v1")
    assert _visible(storage, "out/v1") == [
        f"out/v1/{DEFAULT_MARKER}",
        "out/v1/config.json",
        "out/v1/model.safetensors",
    ]
    assert storage.read_bytes("out/v1/model.safetensors") == SHARD
    assert storage.stat("out/v1/model.safetensors").sha256 == hashlib.sha256(SHARD).hexdigest()
    manifest = json.loads(storage.read_bytes(marker.key))
    assert manifest["files"]["model.safetensors"] == {
        "size": len(SHARD),
        "sha256": hashlib.sha256(SHARD).hexdigest(),
    }
    assert list(storage.list("out/v1/.staging/")) == []  # staging cleaned up


def test_second_commit_raises_and_does_not_overwrite(storage: Storage) -> None:
    first = Publisher(storage, "out/v1", run_id="a")
    _stage(first)
    first.commit(marker_bytes=b"first")
    second = Publisher(storage, "out/v1", run_id="b")
    second.stage_bytes("model.safetensors", b"different")
    with pytest.raises(AlreadyExists, match=r"out/v1: already published; not overwriting"):
        second.commit(marker_bytes=b"second")
    assert storage.read_bytes(f"out/v1/{DEFAULT_MARKER}") == b"first"
    assert storage.read_bytes("out/v1/model.safetensors") == SHARD


def test_missing_staged_file_is_refused(storage: Storage) -> None:
    pub = Publisher(storage, "out/v2", run_id="r")
    _stage(pub)
    expected = dict(pub.records)
    expected["tokenizer.json"] = Expected(size=3, sha256="0" * 64)
    with pytest.raises(CommitRefused, match=r"\.staging/r/tokenizer\.json: staged file is missing"):
        pub.commit(expected)
    assert _visible(storage, "out/v2") == [] and not pub.is_published()


@pytest.mark.parametrize("field", ["size", "sha256"])
def test_mismatched_staged_file_is_refused(storage: Storage, field: str) -> None:
    pub = Publisher(storage, "out/v3", run_id="r")
    _stage(pub)
    good = pub.records["config.json"]
    bad = good.model_copy(update={field: 1 if field == "size" else "f" * 64})
    with pytest.raises(CommitRefused, match=r"config\.json: staged file has"):
        pub.commit({**pub.records, "config.json": bad})
    assert _visible(storage, "out/v3") == []


def test_tampered_bytes_caught_by_deep_verify(storage: Storage) -> None:
    pub = Publisher(storage, "out/v4", run_id="r")
    pub.stage_bytes("config.json", b"abc")
    records = dict(pub.records)
    storage.put_bytes(pub.stage_key("config.json"), b"abd")  # same size, other bytes
    with pytest.raises(CommitRefused, match="SHA-256"):
        commit(storage, pub.staging, "out/v4", records, deep_verify=True)


def test_a_file_of_unknown_origin_in_the_way_is_never_advised_away(storage: Storage) -> None:
    storage.put_bytes("out/v5/config.json", b"the user's own config")
    pub = Publisher(storage, "out/v5", run_id="r")
    _stage(pub)
    with pytest.raises(AlreadyExists) as caught:
        pub.commit()
    message = str(caught.value)
    assert "out/v5/config.json: in the way is a file no quantfleet staging area accounts for" in message
    assert "delete" not in message and "out/v5/.staging/r" in message  # where the result waits
    assert not pub.is_published()
    assert storage.read_bytes("out/v5/config.json") == b"the user's own config"


def test_a_stale_file_of_ours_in_the_way_is_named_as_ours(storage: Storage) -> None:
    # Run "a" died in its commit after copying config.json out of its staging area.
    first = Publisher(storage, "out/v6", run_id="a")
    first.stage_bytes("config.json", b'{"model_type": "llama", "run": "a"}')
    storage.copy(first.stage_key("config.json"), "out/v6/config.json", if_absent=True)
    second = Publisher(storage, "out/v6", run_id="b")
    _stage(second)
    with pytest.raises(AlreadyExists) as caught:
        second.commit()
    message = str(caught.value)
    assert "in the way is a file quantfleet left there in an unfinished commit of another run" in message
    assert "out/v6/.staging/a/config.json" in message and "safe to delete" in message
    assert "no published version refers to it" in message
    storage.delete("out/v6/config.json")  # as the message says; then the commit goes through
    second.commit()
    assert second.is_published()


def test_a_commit_leaves_nothing_of_staging_behind(storage: Storage) -> None:
    pub = Publisher(storage, "out/v7", run_id="r")
    _stage(pub)
    # A worker killed mid-write leaves its unfinished write in the staging area (a temp file
    # locally, a pending multipart upload on S3); it is not an object, so listings skip it.
    killed = pub.stage_writer("model-00002.safetensors", size_hint=len(SHARD))
    killed.write(SHARD)
    pub.commit()
    assert [o.key for o in storage.list("out/v7/")] == [
        f"out/v7/{DEFAULT_MARKER}", "out/v7/config.json", "out/v7/model.safetensors"]
    if isinstance(storage, LocalStorage):
        assert sorted(p.name for p in (storage.root / "out/v7").iterdir()) == [
            DEFAULT_MARKER, "config.json", "model.safetensors"]  # no empty .staging folder
    else:
        assert isinstance(storage, S3Storage)
        assert storage.pending_uploads("out/v7/") == []


def test_a_commit_removes_what_other_runs_staged_there(storage: Storage) -> None:
    # An earlier run of another plan (a failed gate, another recipe) left its result staged; once
    # this prefix is published it can never be committed there, so it only held space (hundreds
    # of GB on a large model). A neighbouring version's staging is not touched.
    earlier = Publisher(storage, "out/v8", run_id="earlier")
    neighbour = Publisher(storage, "out/v9", run_id="n")
    _stage(earlier)
    earlier.stage_writer("model-00002.safetensors", size_hint=len(SHARD)).write(SHARD)  # killed mid-write
    _stage(neighbour)
    pub = Publisher(storage, "out/v8", run_id="r")
    _stage(pub)
    pub.commit()
    assert [o.key for o in storage.list("out/v8/")] == [
        f"out/v8/{DEFAULT_MARKER}", "out/v8/config.json", "out/v8/model.safetensors"]
    assert sorted(o.key for o in storage.list("out/v9/")) == [
        "out/v9/.staging/n/config.json", "out/v9/.staging/n/model.safetensors"]
    if isinstance(storage, LocalStorage):
        assert not (storage.root / "out/v8/.staging").exists()
    else:
        assert isinstance(storage, S3Storage)
        assert storage.pending_uploads("out/v8/") == []


def test_failure_before_marker_leaves_nothing_published_and_commit_resumes(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    store = make_s3_storage(proxy.endpoint_url, s3_bucket, min_part_size=5 * MiB)
    pub = Publisher(store, "out/v1", run_id="r")
    _stage(pub)
    proxy.add("403", method="PUT", path=DEFAULT_MARKER, times=1)  # the commit point fails
    with pytest.raises(AccessDenied):
        pub.commit()
    assert not pub.is_published()  # files were copied, but consumers look for the marker
    pub.commit()  # a retry finds the same bytes already in place and finishes
    assert pub.is_published()
    assert store.read_bytes("out/v1/model.safetensors") == SHARD
