"""Fixtures for infra tests: one moto S3 server per session, storage of either backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.retry import RetryPolicy
from infra.storage import LocalStorage, S3Options, S3Storage, Storage
from tests.infra.fault_proxy import FaultProxy
from tests.s3_server import MotoS3, aws_test_env

# Fast retries keep fault tests quick; the attempt count is what they check.
FAST_RETRY = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    with aws_test_env(), MotoS3() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> str:
    return moto_s3.create_bucket()


def make_s3_storage(endpoint_url: str, bucket: str, prefix: str = "run", **opts: object) -> S3Storage:
    options = S3Options(endpoint_url=endpoint_url, retry=FAST_RETRY, **opts)  # type: ignore[arg-type]
    return S3Storage(bucket, prefix, options)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The same tests run against both backends."""
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    server: MotoS3 = request.getfixturevalue("moto_s3")
    bucket = server.create_bucket()
    # 5 MiB parts (the S3 minimum) let multipart paths run with small test data.
    return make_s3_storage(server.endpoint_url, bucket, min_part_size=5 << 20)


@pytest.fixture
def proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    with FaultProxy(moto_s3.host, moto_s3.port) as p:
        yield p
