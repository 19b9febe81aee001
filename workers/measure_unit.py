"""The measure pass of mixed precision: every candidate scheme's error on each tensor of one unit.

One task per work unit, as convert runs them: the unit's tensors are read (only those, with the
same batched reads), each quantized with every candidate in memory, and the error recorded;
nothing is written. The error is the weight's noise-to-signal ratio ||W - W'||^2 / ||W||^2 (the
relative output noise on isotropic inputs), from the same kernels convert runs. For huge tensors,
`max_rows` evenly spaced rows stand for the whole (groups run along rows, so every scheme
quantizes a sampled row exactly as it would in the full weight; NVFP4's global scale then comes
from the sampled rows' largest magnitude). Stored sizes are exact and computed by the planner
from the headers, so they are not measured here.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from infra.storage import open_storage
from quantizers import QuantScheme, quantize
from quantizers.errors import InvalidWeightError, UnsupportedSchemeError
from quantizers.kernels import COMPILE_MIN_ELEMENTS, compile_floor
from workers.batched_reads import BatchedReader
from workers.errors import CredentialsRefused, UnitFailed, credentials_refused
from workers.source_read import read_dense
from workers.units import WorkUnit

__all__ = ["MeasureContext", "TensorMeasure", "measure_unit", "sample_rows"]


class MeasureContext(BaseModel):
    """What every measure task shares: where to read, the candidates, the device, the sampling."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_uri: str
    candidates: tuple[QuantScheme, ...]
    methods: tuple[str, ...]  # method per candidate
    device: str = "auto"
    max_rows: int = 4096  # rows measured per tensor at most (0: every row)
    read_concurrency: int = 8
    # Tensors of at least this many elements run compiled (the plan's, as in UnitContext).
    compile_min_elements: int = COMPILE_MIN_ELEMENTS


class TensorMeasure(BaseModel):
    """One tensor's error under each candidate (None: the candidate cannot store this shape)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    errors: tuple[float | None, ...]
    rows_measured: int


def sample_rows(weight: torch.Tensor, max_rows: int) -> torch.Tensor:
    """At most `max_rows` evenly spaced rows of `weight` (all of them when it has no more)."""
    rows = weight.shape[0]
    if max_rows <= 0 or rows <= max_rows:
        return weight
    index = torch.linspace(0, rows - 1, max_rows, device=weight.device).round().long()
    return weight.index_select(0, index)


def _device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def measure_unit(unit: WorkUnit, ctx: MeasureContext) -> tuple[TensorMeasure, ...]:
    """Each quantized job of `unit` measured under every candidate; reads only the unit's tensors.

    Credentials the storage rejects fail the unit as a CredentialsRefused (a FailsEveryUnit: the
    driver then measures no further unit, as convert's does)."""
    try:
        return _measure_unit(unit, ctx)
    except CredentialsRefused:
        raise
    except Exception as error:
        refused = credentials_refused(error, f"{unit.index} ({unit.file_name})")
        if refused is None:
            raise
        raise refused from error


def _measure_unit(unit: WorkUnit, ctx: MeasureContext) -> tuple[TensorMeasure, ...]:
    source = open_storage(ctx.source_uri)
    device = _device(ctx.device)
    jobs = [job for job in unit.jobs if job.scheme is not None and not job.passthrough]
    out = []
    with (
        BatchedReader(source, jobs, max_concurrent_reads=ctx.read_concurrency) as reader,
        compile_floor(ctx.compile_min_elements),
    ):
        for job in jobs:
            weight = sample_rows(read_dense(job, reader, device).to(device), ctx.max_rows)
            errors: list[float | None] = []
            for scheme, method in zip(ctx.candidates, ctx.methods, strict=True):
                try:
                    result = quantize(weight, scheme, name=f"{job.name} (in {job.file})", method=method)
                except InvalidWeightError as error:  # NaN/Inf: as convert would refuse it
                    raise UnitFailed(f"unit {unit.index} ({unit.file_name}): {error}") from error
                except UnsupportedSchemeError:
                    errors.append(None)  # a shape this candidate refuses
                    continue
                errors.append(float(result.error.relative_error) ** 2)
            out.append(TensorMeasure(name=job.name, errors=tuple(errors), rows_measured=weight.shape[0]))
    return tuple(out)
