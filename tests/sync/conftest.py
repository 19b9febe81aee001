"""Fixtures for the sync / schedule / verify tests: reuse the pipeline tests' S3, Ray and models."""

from __future__ import annotations

from tests.flows.conftest import local_ray, s3, tiny_llama  # noqa: F401 - fixtures re-exported
