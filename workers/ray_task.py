"""The Ray wrapper of `convert_unit`: the only module of the workers layer that imports Ray.

Ray re-runs a task whose worker process died (`max_retries`); transient storage errors are
retried too. A deterministic failure (bad tensor, failed gate) is not retried: it would fail again.
"""

from __future__ import annotations

import ray
import torch

from infra.errors import TransientStorageError
from quantizers.scheme import QuantScheme
from workers.convert_unit import convert_unit
from workers.kernel_cache import use_kernel_cache
from workers.measure_unit import MeasureContext, TensorMeasure, measure_unit
from workers.records import UnitContext, UnitResult
from workers.units import WorkUnit
from workers.warmup import warm_up

__all__ = ["convert_unit_remote", "measure_unit_remote", "warm_up_remote", "node_name", "MAX_RETRIES"]

MAX_RETRIES = 3


def node_name() -> str:
    """This Ray node as reports show it: its IP and the start of its id (local clusters share IPs)."""
    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


def _prepare_process() -> None:
    """Before each task: compiled kernels come from quantfleet's on-disk cache
    (`workers.kernel_cache`), and torch's threads = the CPUs Ray gave this task. Ray passes
    num_cpus as OMP_NUM_THREADS in the environment it starts a worker with, which torch reads
    once: a reused process would keep the count of whatever task started it."""
    use_kernel_cache()
    cores = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    torch.set_num_threads(max(1, cores))


def _convert_on_node(unit: WorkUnit, context: UnitContext) -> UnitResult:
    _prepare_process()
    return convert_unit(unit, context, node=node_name())


def _warm_up(schemes: tuple[QuantScheme, ...], largest: tuple[int, ...], device: str,
             compile_floor: int | None = None, methods: tuple[str, ...] = (),
             variants: tuple[tuple[bool, ...], ...] = ()) -> float:
    _prepare_process()
    return warm_up(schemes, largest, device, compile_floor, methods, variants)


# Ray accepts a list of exception types here; its type stubs only know the bool form.
# max_calls=0: a worker process serves unit after unit, so CUDA start-up, imports and compiled
# kernels are paid once per process, not per unit. (Ray recycles the process after every call
# for functions declared with num_gpus unless told otherwise; ours get num_gpus per call, but
# say it explicitly so that never changes under us.)
convert_unit_remote = ray.remote(  # type: ignore[call-overload]
    max_retries=MAX_RETRIES, retry_exceptions=[TransientStorageError], max_calls=0
)(_convert_on_node)

# Same process reuse (max_calls=0), so the process it warms is the one that then takes units.
# Not retried: a failed warm-up costs nothing but the time it would have saved.
warm_up_remote = ray.remote(max_retries=0, max_calls=0)(_warm_up)  # type: ignore[call-overload]


def _measure_on_node(unit: WorkUnit, context: MeasureContext) -> tuple[TensorMeasure, ...]:
    _prepare_process()
    return measure_unit(unit, context)


# The mixed-precision measure pass (workers.measure_unit): same retries and process reuse.
measure_unit_remote = ray.remote(  # type: ignore[call-overload]
    max_retries=MAX_RETRIES, retry_exceptions=[TransientStorageError], max_calls=0
)(_measure_on_node)
