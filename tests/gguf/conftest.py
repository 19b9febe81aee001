"""The session's loopback S3 and local Ray (shared with tests/flows), for the GGUF pipeline tests."""

from tests.flows.conftest import local_ray, s3

__all__ = ["local_ray", "s3"]
