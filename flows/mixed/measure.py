"""The measure pass's Ray driver: one task per work unit, a bounded number in flight, as convert.

Each task reads only its unit's tensors and returns small records (`workers.measure_unit`); the
driver gathers them by tensor name. A failing unit is reported with the others at the end, in the
same `ConversionFailed` a conversion raises (one line per unit).
"""

from __future__ import annotations

from collections.abc import Sequence

from flows.execute import (
    ClusterInfo,
    ConversionFailed,
    check_device,
    memory_request,
    task_size,
    unit_failure_line,
    wait_for_one,
    warn_oversized_units,
)
from flows.progress import printing_above_bars, progress_bar
from workers.measure_unit import MeasureContext, TensorMeasure
from workers.units import WorkUnit

__all__ = ["measure_units"]


def _describe(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    return str(cause if cause is not None else error).strip().splitlines()[-1]


def measure_units(
    units: Sequence[WorkUnit], context: MeasureContext, *, cluster: ClusterInfo
) -> dict[str, TensorMeasure]:
    """{tensor name: its errors per candidate} over every unit; raises ConversionFailed listing failures."""
    import ray

    from workers.ray_task import measure_unit_remote

    check_device(context.device, cluster)
    work = [u for u in units if any(j.scheme is not None and not j.passthrough for j in u.jobs)]
    # As conversion sizes its tasks: a plan of fewer units than cores measures on all of them.
    size = task_size(cluster, max((u.memory_bytes for u in work), default=0), len(work))
    limit = max(2, size.slots * 2)
    warn_oversized_units(work, cluster)
    pending = list(reversed(work))
    in_flight: dict[ray.ObjectRef, WorkUnit] = {}
    errors: dict[str, TensorMeasure] = {}
    failures: list[tuple[WorkUnit, str]] = []
    with progress_bar(total=len(work), desc=f"measuring {len(context.candidates)} candidates", unit="unit",
                      leave=False) as bar, printing_above_bars():
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                unit = pending.pop()
                ref = measure_unit_remote.options(
                    num_cpus=size.threads, num_gpus=size.num_gpus,
                    memory=memory_request(unit.memory_bytes, cluster), name=f"measure {unit.file_name}",
                ).remote(unit, context)
                in_flight[ref] = unit
            done = wait_for_one(list(in_flight))
            for ref in done:
                unit = in_flight.pop(ref)
                bar.update(1)
                try:
                    records = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - every failure is collected and reported
                    failures.append((unit, unit_failure_line(unit, _describe(error))))
                    continue
                errors.update({r.name: r for r in records})
    if failures:
        raise ConversionFailed(sorted(failures, key=lambda f: f[0].index))
    return errors
