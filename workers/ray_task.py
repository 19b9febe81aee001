"""The Ray wrapper of `convert_unit`: the only module of the workers layer that imports Ray.

Ray re-runs a task whose worker process died (`max_retries`); transient storage errors are
retried too. A deterministic failure (bad tensor, failed gate) is not retried: it would fail again.
"""

from __future__ import annotations

import ray

from infra.errors import TransientStorageError
from workers.convert_unit import convert_unit
from workers.records import UnitContext, UnitResult
from workers.units import WorkUnit

__all__ = ["convert_unit_remote", "MAX_RETRIES"]

MAX_RETRIES = 3


def _convert_on_node(unit: WorkUnit, context: UnitContext) -> UnitResult:
    result = convert_unit(unit, context)
    return result.model_copy(update={"node": ray.get_runtime_context().get_node_id()})


# Ray accepts a list of exception types here; its type stubs only know the bool form.
convert_unit_remote = ray.remote(  # type: ignore[call-overload]
    max_retries=MAX_RETRIES, retry_exceptions=[TransientStorageError]
)(_convert_on_node)
