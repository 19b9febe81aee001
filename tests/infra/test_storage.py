"""Storage contract tests, run against the local backend and a real S3 HTTP endpoint (moto)."""

from __future__ import annotations

import hashlib
import mmap
import os
import time

import pytest
import torch

from infra.errors import AlreadyExists, InvalidURI, ObjectNotFound, StorageError
from infra.storage import LocalStorage, S3Storage, Storage, open_storage, parse_uri
from infra.storage.parts import MAX_PARTS, MiB, PartPlan, plan_part_size

from .conftest import make_s3_storage


def _payload(n: int, seed: int = 0) -> bytes:
    return (
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        .numpy()
        .tobytes()
    )


def test_put_stat_read_roundtrip(storage: Storage) -> None:
    data = _payload(1000)
    res = storage.put_bytes("a/b.bin", data)
    assert res.size == 1000 and res.sha256 == hashlib.sha256(data).hexdigest()
    info = storage.stat("a/b.bin")
    assert info.size == 1000 and info.sha256 == res.sha256
    assert storage.read_range("a/b.bin", 10, 20) == data[10:30]
    assert storage.read_bytes("a/b.bin") == data
    buf = torch.empty(50, dtype=torch.uint8)
    storage.read_range_into("a/b.bin", 900, memoryview(buf.numpy()))
    assert buf.numpy().tobytes() == data[900:950]


def test_streaming_multipart_write(storage: Storage) -> None:
    # 12 MiB + a tail in uneven writes: three 5 MiB parts on S3, temp+rename locally.
    data = _payload(12 * MiB + 12345, seed=1)
    with storage.open_writer("big/shard.bin", size_hint=len(data)) as w:
        for start in range(0, len(data), 3 * MiB + 7):
            w.write(data[start : start + 3 * MiB + 7])
        assert not storage.exists("big/shard.bin")  # invisible until close
        res = w.close()
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    info = storage.stat("big/shard.bin")
    assert (info.size, info.sha256) == (len(data), res.sha256)
    assert storage.read_range("big/shard.bin", 5 * MiB - 3, 10) == data[5 * MiB - 3 : 5 * MiB + 7]
    assert storage.hash_object("big/shard.bin") == res.sha256


def test_failed_write_leaves_nothing(storage: Storage) -> None:
    with pytest.raises(RuntimeError), storage.open_writer("x/part.bin") as w:
        w.write(_payload(11 * MiB))
        raise RuntimeError("worker crashed")
    assert not storage.exists("x/part.bin")
    assert list(storage.list("x/")) == []
    assert storage.abort_stale_uploads("x/") == 0  # the writer already aborted


def test_list_is_recursive_sorted_and_prefix_filtered(storage: Storage) -> None:
    for key in ["m/b.txt", "m/a/c.txt", "m/a/b/d.txt", "n/e.txt", "mm.txt"]:
        storage.put_bytes(key, key.encode())
    assert [i.key for i in storage.list("m/")] == ["m/a/b/d.txt", "m/a/c.txt", "m/b.txt"]
    assert [i.key for i in storage.list("m")] == ["m/a/b/d.txt", "m/a/c.txt", "m/b.txt", "mm.txt"]
    assert len(list(storage.list())) == 5
    assert storage.delete_prefix("m/") == 3
    assert [i.key for i in storage.list()] == ["mm.txt", "n/e.txt"]


def test_conditional_put_never_overwrites(storage: Storage) -> None:
    storage.put_bytes("k", b"first", if_absent=True)
    with pytest.raises(AlreadyExists, match=r"k: already exists"):
        storage.put_bytes("k", b"second", if_absent=True)
    assert storage.read_bytes("k") == b"first"
    storage.put_bytes("k", b"third")  # unconditional writes replace
    assert storage.read_bytes("k") == b"third"


def test_conditional_multipart_never_overwrites(storage: Storage) -> None:
    storage.put_bytes("big", b"taken")
    with pytest.raises(AlreadyExists), storage.open_writer("big", if_absent=True) as w:
        w.write(_payload(6 * MiB))
    assert storage.read_bytes("big") == b"taken"
    assert storage.abort_stale_uploads() == 0


def test_copy_keeps_sha256_and_respects_if_absent(storage: Storage) -> None:
    res = storage.put_bytes("src/config.json", b'{"a": 1}')
    info = storage.copy("src/config.json", "dst/config.json", if_absent=True)
    assert (info.size, info.sha256) == (res.size, res.sha256)
    with pytest.raises(AlreadyExists):
        storage.copy("src/config.json", "dst/config.json", if_absent=True)
    with pytest.raises(ObjectNotFound, match="nope"):
        storage.copy("src/nope", "dst/nope")


def test_missing_objects_name_the_uri(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound, match=r"missing/key\.bin: not found"):
        storage.stat("missing/key.bin")
    with pytest.raises(ObjectNotFound, match=r"missing/key\.bin"):
        storage.read_range("missing/key.bin", 0, 1)
    storage.delete("missing/key.bin")  # deleting nothing is fine


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../b", "a//b", ""])
def test_unsafe_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidURI):
        storage.put_bytes(key, b"x")


def test_large_copy_uses_multipart_copy(moto_s3, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    store = make_s3_storage(moto_s3.endpoint_url, s3_bucket, copy_part_size=5 * MiB)
    data = _payload(11 * MiB, seed=3)
    res = store.put_bytes("a.bin", data)
    info = store.copy("a.bin", "b.bin", if_absent=True)  # 3 UploadPartCopy parts
    assert (info.size, info.sha256) == (len(data), res.sha256)
    assert store.hash_object("b.bin") == res.sha256


def test_open_storage_and_uris(tmp_path, monkeypatch, moto_s3) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}/x"), LocalStorage)
    assert parse_uri("s3://bkt/a/b/").path == "a/b"
    assert str(parse_uri("s3://bkt")) == "s3://bkt"
    with pytest.raises(InvalidURI, match="unsupported scheme 'gs'"):
        open_storage("gs://bkt/x")
    with pytest.raises(InvalidURI, match="missing bucket"):
        open_storage("s3:///x")
    bucket = moto_s3.create_bucket()
    monkeypatch.setenv("QUANTFLEET_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    store = open_storage(f"s3://{bucket}/models/m1")
    assert isinstance(store, S3Storage)
    store.put_bytes("config.json", b"{}")
    assert store.uri("config.json") == f"s3://{bucket}/models/m1/config.json"
    assert [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]] == [
        "models/m1/config.json"
    ]


def test_part_plan_fits_10000_parts() -> None:
    assert plan_part_size(None) == 16 * MiB
    assert plan_part_size(50 * 10**9) == 16 * MiB  # 2,981 parts
    assert plan_part_size(500 * 10**9) == 48 * MiB
    assert plan_part_size(1000, min_part_size=1) == 5 * MiB
    big = 4 * 2**40
    size = plan_part_size(big)
    assert -(-big // size) <= MAX_PARTS
    growing = PartPlan(None)
    assert sum(growing.size_of(n) for n in range(1, MAX_PARTS + 1)) > 5 * 2**40
    with pytest.raises(ValueError, match="size_hint"):
        PartPlan(10).size_of(MAX_PARTS + 1)


def test_local_writes_are_atomic_temp_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalStorage(tmp_path)
    w = store.open_writer("d/f.bin")
    w.write(b"abc")
    names = os.listdir(tmp_path / "d")
    assert len(names) == 1 and names[0].startswith(".qf-tmp-") and names[0].endswith("-f.bin")
    assert list(store.list()) == []
    w.close()
    assert os.listdir(tmp_path / "d") == ["f.bin"]


def test_unsafe_prefixes_are_refused(storage: Storage) -> None:
    with pytest.raises(InvalidURI):
        list(storage.list("../"))


def test_local_map_range_is_the_files_bytes_copy_on_write_and_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalStorage(tmp_path)
    data = _payload(3 * mmap.ALLOCATIONGRANULARITY + 123)
    store.put_bytes("d/f.bin", data)
    offset, length = mmap.ALLOCATIONGRANULARITY + 17, 2 * mmap.ALLOCATIONGRANULARITY  # unaligned start
    view = store.map_range("d/f.bin", offset, length)
    assert view is not None and bytes(view) == data[offset : offset + length]
    view[0] = (view[0] + 1) % 256  # a private map: the file must not change
    assert store.read_range("d/f.bin", 0, len(data)) == data
    with pytest.raises(StorageError, match="short read"):
        store.map_range("d/f.bin", len(data) - 10, 11)
    with pytest.raises(ObjectNotFound):
        store.map_range("d/missing.bin", 0, 1)


def test_an_unreachable_endpoint_is_named() -> None:
    # Nothing listens on a port just freed: the error says which endpoint, not only the class name.
    import socket

    from infra.errors import TransientStorageError
    from infra.retry import RetryPolicy
    from infra.storage import S3Options
    from tests.s3_server import aws_test_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = S3Options(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                        retry=RetryPolicy(max_attempts=1), connect_timeout_s=2)
    expected = rf"list failed transiently: cannot connect to http://127\.0\.0\.1:{port} \(the S3 endpoint"
    with aws_test_env(), pytest.raises(TransientStorageError, match=expected):
        list(open_storage("s3://bucket/prefix", **options.model_dump()).list())


def test_a_local_files_recorded_digest_is_not_trusted_once_written_in_place(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    data = _payload(4096, seed=3)
    written = storage.put_bytes("a.bin", data)
    if storage.stat("a.bin").sha256 is None:
        pytest.skip("this filesystem keeps no user extended attributes: every stat hashes nothing")
    assert storage.stat("a.bin").sha256 == written.sha256
    assert storage.copy("a.bin", "copy.bin").sha256 == written.sha256
    # Another tool edits the file in place, same size. The sleep steps past the coarse clock tick
    # the kernel stamps modification times with (a few ms), as any later edit does.
    time.sleep(0.05)
    with open(tmp_path / "a.bin", "r+b") as handle:
        handle.seek(100)
        handle.write(bytes(16))
    info = storage.stat("a.bin")
    assert info.size == len(data) and info.sha256 is None
    assert storage.hash_object("a.bin") != written.sha256
