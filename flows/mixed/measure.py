"""The measure pass's Ray driver: one task per work unit, a bounded number in flight, as convert.

Each task reads only its unit's tensors and returns small records (`workers.measure_unit`); the
driver gathers them by tensor name. The queue is convert's (`flows.execute.run_queue`): a failing
unit is reported with the others at the end, in the same `ConversionFailed` a conversion raises
(one line per unit), and credentials the storage rejects measure no further unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flows.execute import (
    ClusterInfo,
    check_device,
    memory_request,
    run_queue,
    task_size,
    warn_oversized_units,
)
from flows.progress import printing_above_bars, progress_bar
from workers.measure_unit import MeasureContext, TensorMeasure
from workers.units import WorkUnit

__all__ = ["measure_units"]


def measure_units(
    units: Sequence[WorkUnit], context: MeasureContext, *, cluster: ClusterInfo
) -> dict[str, TensorMeasure]:
    """{tensor name: its errors per candidate} over every unit; raises ConversionFailed listing failures."""
    from workers.ray_task import measure_unit_remote

    check_device(context.device, cluster)
    work = [u for u in units if any(j.scheme is not None and not j.passthrough for j in u.jobs)]
    # As conversion sizes its tasks: a plan of fewer units than cores measures on all of them.
    size = task_size(cluster, max((u.memory_bytes for u in work), default=0), len(work))
    limit = max(2, size.slots * 2)
    warn_oversized_units(work, cluster)

    def submit(unit: WorkUnit) -> Any:
        return measure_unit_remote.options(
            num_cpus=size.threads, num_gpus=size.num_gpus,
            memory=memory_request(unit.memory_bytes, cluster), name=f"measure {unit.file_name}",
        ).remote(unit, context)

    with progress_bar(total=len(work), desc=f"measuring {len(context.candidates)} candidates", unit="unit",
                      leave=False) as bar, printing_above_bars():
        outcome = run_queue(work, submit, limit, on_settled=lambda _: bar.update(1))
    outcome.raise_failures(staged=False)
    return {record.name: record for records in outcome.results.values() for record in records}
