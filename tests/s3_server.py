"""A real S3 HTTP endpoint on loopback for tests: moto's ThreadedMotoServer.

Reusable from any test folder:

    from tests.s3_server import MotoS3
    with MotoS3() as s3:
        s3.create_bucket("models")
        store = open_storage("s3://models/x", endpoint_url=s3.endpoint_url)

Credentials are dummies set in the environment by `aws_test_env()`; nothing leaves the machine.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

__all__ = ["DUMMY_AWS_ENV", "MotoS3", "aws_test_env", "unique_bucket_name"]

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Variables that could point tests at a real account or another endpoint.
_CLEARED = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "QUANTFLEET_S3_ENDPOINT_URL")


@contextmanager
def aws_test_env() -> Iterator[None]:
    """Dummy credentials and region for the duration of the block; restores the environment."""
    saved = {k: os.environ.get(k) for k in (*DUMMY_AWS_ENV, *_CLEARED)}
    os.environ.update(DUMMY_AWS_ENV)
    for k in _CLEARED:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unique_bucket_name(stem: str = "qf") -> str:
    return f"{stem}-{uuid.uuid4().hex[:12]}"


class MotoS3:
    """moto's S3 server on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        # werkzeug logs every request at INFO; keep test output readable.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.host = host
        self.port = port

    def start(self) -> Self:
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, endpoint_url: str | None = None) -> Any:
        """A plain boto3 client for test set-up and inspection (not the code under test)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name="us-east-1",
            config=Config(request_checksum_calculation="when_required"),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or unique_bucket_name()
        self.client().create_bucket(Bucket=name)
        return name

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
