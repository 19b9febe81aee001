"""The Ray wrapper of `convert_unit`: the only module of the workers layer that imports Ray.

Ray re-runs a task whose worker process died (`max_retries`); transient storage errors are
retried too. A deterministic failure (bad tensor, failed gate) is not retried: it would fail again.
"""

from __future__ import annotations

import ray

from infra.errors import TransientStorageError
from workers.convert_unit import convert_unit

__all__ = ["convert_unit_remote", "MAX_RETRIES"]

MAX_RETRIES = 3

convert_unit_remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=[TransientStorageError])(
    convert_unit
)
