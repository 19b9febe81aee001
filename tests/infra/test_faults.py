"""Transient faults are retried, permanent ones fail at once; all through real HTTP."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from infra.errors import AccessDenied, CredentialsRejected, ObjectNotFound, TransientStorageError
from infra.storage import S3Storage
from infra.storage.parts import MiB

from .conftest import FAST_RETRY, make_s3_storage
from .fault_proxy import FaultProxy

PART = r"partNumber="


@pytest.fixture
def store(proxy: FaultProxy, s3_bucket: str) -> S3Storage:
    return make_s3_storage(proxy.endpoint_url, s3_bucket, min_part_size=5 * MiB)


def test_503_and_slowdown_are_retried(store: S3Storage, proxy: FaultProxy) -> None:
    proxy.add("503", method="PUT", times=1)
    proxy.add("slowdown", method="PUT", times=1)
    store.put_bytes("a.bin", b"payload")
    assert proxy.count("PUT", "a.bin") == 3
    proxy.add("slowdown", method="HEAD", times=2)
    assert store.stat("a.bin").size == 7
    assert proxy.count("HEAD") == 3


def test_dropped_connections_during_multipart_are_retried(store: S3Storage, proxy: FaultProxy) -> None:
    data = bytes(range(256)) * (44 * 1024)  # 11 MiB: three parts
    proxy.add("drop", method="PUT", path=PART, times=2)
    proxy.add("drop", method="POST", path=r"uploadId=", times=1)  # the complete request
    with store.open_writer("big.bin", size_hint=len(data)) as w:
        w.write(data)
    assert store.read_bytes("big.bin") == data
    assert proxy.count("PUT", PART) == 3 + 2


def test_reset_mid_download_restarts_the_range(store: S3Storage, proxy: FaultProxy) -> None:
    data = bytes(range(256)) * 4096
    store.put_bytes("r.bin", data)
    proxy.add("cut_body", method="GET", times=1)
    proxy.add("drop", method="GET", times=1)
    assert store.read_range("r.bin", 1000, 500_000) == data[1000:501_000]
    assert proxy.count("GET") == 3


def test_403_fails_at_once_naming_the_uri(store: S3Storage, proxy: FaultProxy) -> None:
    store.put_bytes("secret.bin", b"x")
    proxy.add("403", method="GET", times=5)
    with pytest.raises(AccessDenied) as err:
        store.read_range("secret.bin", 0, 1)
    assert str(err.value) == (f"{store.uri('secret.bin')}: access denied (read): AccessDenied: Access Denied")
    assert proxy.count("GET") == 1  # no retries for a permanent error


def test_an_expired_session_token_is_denied_and_not_retried(store: S3Storage, proxy: FaultProxy) -> None:
    # A 400, not a 403: it was a generic StorageError. The credentials themselves are refused, so
    # every other request fails too (the driver stops the run on it).
    proxy.add("expired", method="PUT", times=5)
    with pytest.raises(CredentialsRejected, match=r"access denied \(put\): ExpiredToken: The provided token"):
        store.put_bytes("late.bin", b"x")
    assert proxy.count("PUT") == 1


def test_missing_key_fails_at_once(store: S3Storage, proxy: FaultProxy) -> None:
    with pytest.raises(ObjectNotFound, match=r"s3://.*/run/none\.bin: not found \(read\)"):
        store.read_range("none.bin", 0, 1)
    assert proxy.count("GET") == 1


def test_retries_are_bounded(store: S3Storage, proxy: FaultProxy) -> None:
    proxy.add("503", method="PUT", times=100)
    with pytest.raises(TransientStorageError, match=r"/run/t\.bin: put failed transiently"):
        store.put_bytes("t.bin", b"x")
    assert proxy.count("PUT") == FAST_RETRY.max_attempts


def test_permanent_part_failure_aborts_the_upload(
    store: S3Storage,
    proxy: FaultProxy,
    moto_s3,
    s3_bucket: str,  # type: ignore[no-untyped-def]
) -> None:
    proxy.add("403", method="PUT", path=r"partNumber=2", times=10)
    with pytest.raises(AccessDenied), store.open_writer("p.bin") as w:
        w.write(b"\0" * (11 * MiB))
    assert not store.exists("p.bin")
    assert moto_s3.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_requests_carry_sha256_checksums(store: S3Storage, proxy: FaultProxy) -> None:
    data = b"\x01" * (6 * MiB)
    res = store.put_bytes("small.bin", b"abc")
    put = next(s for s in proxy.seen if s.method == "PUT" and s.path.endswith("small.bin"))
    assert put.headers["x-amz-meta-sha256"] == res.sha256
    assert put.headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
    with store.open_writer("m.bin", size_hint=len(data)) as w:
        w.write(data)
    part1 = next(s for s in proxy.seen if s.method == "PUT" and re.search(r"partNumber=1(&|$)", s.path))
    first = base64.b64encode(hashlib.sha256(data[: 5 * MiB]).digest()).decode()
    assert part1.headers["x-amz-checksum-sha256"] == first
    assert store.stat("m.bin").sha256 == hashlib.sha256(data).hexdigest()


def test_moto_does_not_verify_checksums(moto_s3, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    """Pins a fact the S3 backend's docs rely on: moto 5.2.5 stores but never verifies
    x-amz-checksum-sha256 (AWS S3 rejects a mismatch with BadDigest). If moto starts verifying,
    this test fails and a corrupted-upload test can replace it."""
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    moto_s3.client().put_object(Bucket=s3_bucket, Key="k", Body=b"data", ChecksumSHA256=wrong)
