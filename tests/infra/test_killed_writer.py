"""A worker SIGKILLed in the middle of a streaming write leaves nothing at the final key; the
leftover upload is cleaned by abort_stale_uploads and a retry completes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from infra.errors import ObjectNotFound
from infra.storage import LocalStorage, S3Storage, Storage
from infra.storage.parts import MiB

from .conftest import make_s3_storage

CHILD = r"""
import sys, time
from infra.storage import open_storage
uri, endpoint = sys.argv[1], sys.argv[2]
opts = {"endpoint_url": endpoint, "min_part_size": 5 << 20} if uri.startswith("s3://") else {}
store = open_storage(uri, **opts)
w = store.open_writer("shard.safetensors", size_hint=30 << 20)
w.write(b"\x07" * (12 << 20))   # two full parts go out on S3
print("READY", flush=True)
time.sleep(120)                  # killed here, mid-upload
"""


def _pending(storage: Storage) -> int:
    if isinstance(storage, S3Storage):
        return len(storage.pending_uploads())
    assert isinstance(storage, LocalStorage)
    return sum(1 for _, _, files in os.walk(storage.root) for f in files if f.startswith(".qf-tmp-"))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_mid_upload(backend: str, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    if backend == "local":
        storage: Storage = LocalStorage(tmp_path / "store")
        uri, endpoint = str(tmp_path / "store"), ""
    else:
        server = request.getfixturevalue("moto_s3")
        bucket = server.create_bucket()
        storage = make_s3_storage(server.endpoint_url, bucket, prefix="dst", min_part_size=5 * MiB)
        uri, endpoint = f"s3://{bucket}/dst", server.endpoint_url
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 20
        while _pending(storage) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(ObjectNotFound):
        storage.stat("shard.safetensors")
    assert [o.key for o in storage.list()] == []
    assert _pending(storage) == 1
    assert storage.abort_stale_uploads("shard") == 1
    assert _pending(storage) == 0
    data = b"\x07" * (12 * MiB)
    with storage.open_writer("shard.safetensors", size_hint=len(data)) as w:  # the retry
        w.write(data)
    info = storage.stat("shard.safetensors")
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
