"""Publishing is a commit: verified, marker last, never overwritten, nothing visible on failure."""

from __future__ import annotations

import hashlib
import json

import pytest

from infra.errors import AccessDenied, AlreadyExists, CommitRefused
from infra.publish import DEFAULT_MARKER, Expected, Publisher, commit, is_published
from infra.storage import Storage
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


def test_unpublished_debris_with_other_contents_blocks_commit(storage: Storage) -> None:
    storage.put_bytes("out/v5/config.json", b"left by another run")
    pub = Publisher(storage, "out/v5", run_id="r")
    _stage(pub)
    with pytest.raises(AlreadyExists, match="unpublished file with other contents"):
        pub.commit()
    assert not pub.is_published()


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
