"""What one worker does with one work unit: read, quantize, check, assemble, upload, record.

Plain functions, testable without Ray. The shard is assembled in a local scratch file at the
offsets its header fixes, so tensors may be produced in any order while at most one source tensor
and its quantized parts are in memory; the file is then streamed to the staging prefix, and a
small JSON record written after it marks the unit done. A re-run that finds the record and a
shard with the recorded size and checksum skips the unit.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from infra.errors import StorageError
from infra.safetensors import TensorReader, TensorSpec, layout
from infra.storage import Storage, open_storage
from quantizers import (
    QuantizationError,
    estimate_output_error,
    keeps_dequantized,
    method_passes,
    probe_vectors,
    quantize,
)
from quantizers.kernels import compile_floor
from workers.batched_reads import BatchedReader
from workers.errors import (
    FailsEveryUnit,
    TensorQualityError,
    UnitFailed,
    out_of_space,
    shared_failure,
)
from workers.pipeline import ShardSink, run_pipelined
from workers.records import TensorRecord, UnitContext, UnitResult
from workers.source_read import carry_over, read_dense, shared_absmax, source_label
from workers.units import TensorJob, WorkUnit, output_specs

__all__ = ["convert_unit", "keeps_dequantized_weight", "unit_record_key", "SHARD_METADATA"]

_log = logging.getLogger(__name__)

# The only metadata a shard carries: transformers requires format=pt. Nothing run-specific, so
# every run of the same plan writes the same bytes.
SHARD_METADATA = {"format": "pt"}
_UPLOAD_CHUNK = 16 << 20


def unit_record_key(unit: WorkUnit) -> str:
    return f"units/{unit.index:05d}.json"


def keeps_dequantized_weight(job: TensorJob, probes: int) -> bool:
    """Whether `job`'s quantization keeps its dequantized weight for the output-error probes
    (`quantizers.keeps_dequantized`). NVFP4 partners never do: their shared global scale has the
    probes quantize a sample of their own."""
    return probes > 0 and not job.partners and keeps_dequantized(job.shape)


def _device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def _below_gates(
    job: TensorJob, ctx: UnitContext, sqnr_db: float, cosine: float, output_error: float | None
) -> str | None:
    """Why a quantized tensor's figures fail the recipe's per-tensor gates, or None."""
    assert job.scheme is not None
    gate, limit = ctx.min_sqnr_db[job.scheme], ctx.max_output_error
    if not (sqnr_db >= gate and cosine >= ctx.min_cosine):
        why = (f"SQNR {sqnr_db:.1f} dB and cosine {cosine:.4f}, below the gate "
               f"(SQNR >= {gate:g} dB, cosine >= {ctx.min_cosine:g})")
    elif limit is not None and output_error is not None and not output_error <= limit:
        why = (f"output error {output_error:.4f} on {ctx.probes} random probes, above the "
               f"gate (output error <= {limit:g})")
    else:
        return None  # every tensor passes through here: the message is built only for a failure
    scheme = ctx.schemes[job.scheme]
    return f"{job.name} (in {job.file}): {scheme.name} ({scheme.describe()}) gives {why}"


def check_reused_gates(
    done: UnitResult, unit: WorkUnit, below: Callable[[TensorJob, float, float, float | None], str | None]
) -> UnitResult:
    """A staged unit passes the gates this run has, not only those it was converted under (the
    staging id leaves the per-tensor gates out, so a tightened gate must be checked here).
    `below(job, sqnr_db, cosine, output_error)` is the unit kind's gate check."""
    jobs = {job.name: job for job in unit.jobs}
    for record in done.tensors:
        job = jobs.get(record.name)
        if job is None or record.scheme is None or record.sqnr_db is None or record.cosine is None:
            continue  # kept, or carried over as the source stored it: no figures to gate
        why = below(job, record.sqnr_db, record.cosine, record.output_error)
        if why is not None:
            raise UnitFailed(f"unit {unit.index} ({unit.file_name}): {why} (as staged by an earlier run)")
    return done


def _finished(staging: Storage, unit: WorkUnit) -> UnitResult | None:
    """The unit's result if an earlier run staged it completely and intact, else None."""
    try:
        record = UnitResult.model_validate_json(staging.read_bytes(unit_record_key(unit)))
        info = staging.stat(unit.file_name)
    except (StorageError, ValueError):
        return None
    sha = info.sha256 or staging.hash_object(unit.file_name)
    if info.size != record.size or sha != record.sha256:
        _log.warning("unit %d: staged %s does not match its record; redoing it", unit.index, unit.file_name)
        return None
    return record.model_copy(update={"reused": True})


@contextmanager
def _scratch_file(
    staging: Storage, unit: WorkUnit, directory: str | None
) -> Iterator[tuple[int, Path, bool]]:
    """A file to assemble the shard in: beside its staged name when the staging storage can adopt
    it (local disk: no second copy), else in the scratch directory (then streamed up).

    A write that meets a full disk ends the block as OutOfSpace, naming the unit and the folder.
    """
    beside = staging.scratch_path(unit.file_name) if directory is None else None
    if beside is not None:
        handle, path = os.open(beside, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), beside
    else:
        handle, name = tempfile.mkstemp(prefix="quantfleet-", suffix=".safetensors", dir=directory)
        path = Path(name)
    try:
        try:
            yield handle, path, beside is not None
        finally:
            os.close(handle)
            path.unlink(missing_ok=True)  # already gone once adopted
    except Exception as error:  # after the unlink, so the message counts the space it held as free
        in_temp_folder = beside is None and directory is None  # tempfile's: TMPDIR moves it
        full = out_of_space(error, f"{unit.index} ({unit.file_name})", path, in_temp_folder)
        if full is None:
            raise
        raise full from error


def _origin(source: Storage | None, key: str, begin: int) -> tuple[Path, int] | None:
    """Where a kept tensor's bytes already lie on this machine, so the sink can copy them file to
    file; None for remote sources."""
    path = source.local_path(key) if source is not None else None
    return None if path is None else (path, begin)


def _convert_job(
    job: TensorJob,
    reader: TensorReader,  # in a unit, the pipeline's Prefetcher (same read())
    ctx: UnitContext,
    device: torch.device,
    write: dict[str, int],
    sink: ShardSink,
    magnitudes: dict[str, torch.Tensor] | None = None,
    source_storage: Storage | None = None,
) -> TensorRecord:
    bytes_in = sum(p.end - p.begin for p in job.parts) if job.parts else job.end - job.begin
    source = source_label(job)
    if job.passthrough:
        assert job.scheme is not None
        copied = carry_over(job, reader, lambda name, tensor, part: sink.put(
            tensor, write[name], origin=_origin(source_storage, part.file, part.begin)))
        return TensorRecord(name=job.name, scheme=f"{ctx.schemes[job.scheme].name} "
                            f"{ctx.schemes[job.scheme].describe()}", bytes_in=bytes_in, bytes_out=copied,
                            source=source)
    tensor = read_dense(job, reader, device)
    if job.scheme is None:
        # Only a plain source's bytes are the output's; a quantized source's were dequantized.
        origin = _origin(source_storage, job.file, job.begin) if job.source is None else None
        written = sink.put(tensor, write[job.name], origin=origin)
        return TensorRecord(name=job.name, scheme=None, bytes_in=bytes_in, bytes_out=written, source=source)
    scheme = ctx.schemes[job.scheme]
    weight = tensor.to(device)
    shared = shared_absmax(job, weight, reader, device, {} if magnitudes is None else magnitudes)
    method = ctx.methods[job.scheme] if ctx.methods else "rtn"
    result = quantize(weight, scheme, name=f"{job.name} (in {job.file})", global_absmax=shared,
                      method=method, keep_dequantized=keeps_dequantized_weight(job, ctx.probes))
    error = result.error  # measured inside the quantization kernel
    probed = None
    if ctx.probes > 0:
        probes = probe_vectors(weight.shape[1], ctx.probes, device=weight.device)
        # On at most ~1024 sampled rows: exact for those rows, a fraction of the full cost. NVFP4
        # partners (a shared global scale) keep the estimate's own, as they always have.
        probed = estimate_output_error(weight, result.scheme, probes, method=result.method,
                                       quantized=None if shared is not None else result)
    result.release()
    below = _below_gates(job, ctx, error.sqnr_db, error.cosine, probed)
    if below is not None:
        raise TensorQualityError(below)
    bytes_out = 0
    for suffix, part in result.tensors.items():
        bytes_out += sink.put(part, write[f"{job.module}.{suffix}"])
    return TensorRecord(
        name=job.name, scheme=f"{scheme.name} {scheme.describe()}", note=job.note,
        bytes_in=bytes_in, bytes_out=bytes_out, sqnr_db=error.sqnr_db,
        relative_error=error.relative_error, cosine=error.cosine, max_abs_error=error.max_abs_error,
        output_error=probed, source=source,
        method=None if result.method == "rtn" else result.method,
        method_passes=None if result.method == "rtn" else method_passes(result.method),
    )


def _upload(fd: int, size: int, staging: Storage, key: str) -> tuple[int, str]:
    with staging.open_writer(key, size_hint=size) as writer:
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(_UPLOAD_CHUNK, size - offset), offset)
            if not chunk:
                raise UnitFailed(f"{staging.uri(key)}: scratch file ended at {offset} of {size} bytes")
            writer.write(chunk)
            offset += len(chunk)
        result = writer.close()
    return result.size, result.sha256


def convert_unit(unit: WorkUnit, ctx: UnitContext, node: str = "local") -> UnitResult:
    """Convert `unit` and stage its shard; returns the record (a finished unit is not redone).

    `node` names the machine for the record (the Ray wrapper passes its node), so a resumed run
    reports where and how fast each unit really ran. A destination that stopped taking writes, or
    credentials the storage rejects, fail the unit as a FailsEveryUnit (the driver then starts no
    further unit).
    """
    try:
        return _convert_unit(unit, ctx, node)
    except FailsEveryUnit:
        raise
    except Exception as error:
        staging = open_storage(ctx.staging_uri)
        beside = staging.local_path(unit.file_name)
        folders = [Path(ctx.scratch_dir or tempfile.gettempdir())]
        folders += [beside.parent] if beside is not None else []
        refused = shared_failure(error, f"{unit.index} ({unit.file_name})", staging.uri(), folders)
        if refused is None:
            raise
        raise refused from error


def _convert_unit(unit: WorkUnit, ctx: UnitContext, node: str) -> UnitResult:
    if ctx.output_format == "gguf":
        from workers.gguf_unit import convert_gguf_unit

        return convert_gguf_unit(unit, ctx, node)
    started = time.perf_counter()
    staging = open_storage(ctx.staging_uri)
    done = _finished(staging, unit)
    if done is not None:
        return check_reused_gates(done, unit, lambda job, sqnr, cosine, output_error: _below_gates(
            job, ctx, sqnr, cosine, output_error))
    source = open_storage(ctx.source_uri)
    device = _device(ctx.device)
    specs = [
        TensorSpec(name=name, dtype=dtype, shape=shape)
        for job in unit.jobs
        for name, dtype, shape in output_specs(job, ctx.schemes)
    ]
    header, ordered = layout(specs, SHARD_METADATA)
    offsets: dict[str, int] = {}
    position = len(header)
    for spec in ordered:
        offsets[spec.name] = position
        position += spec.nbytes
    largest = max((job.end - job.begin for job in unit.jobs), default=0)
    with _scratch_file(staging, unit, ctx.scratch_dir) as (fd, path, adoptable):
        os.ftruncate(fd, position)
        magnitudes: dict[str, torch.Tensor] = {}  # NVFP4 partners' largest magnitudes, read once
        with (
            BatchedReader(source, unit.jobs, max_concurrent_reads=ctx.read_concurrency) as ahead,
            TensorReader(source, max_concurrent_reads=ctx.read_concurrency) as direct,
            compile_floor(ctx.compile_min_elements),
        ):
            try:
                records, sha256 = run_pipelined(
                    unit.jobs, ahead, fd, header, position, device,
                    lambda job, prefetched, sink: _convert_job(
                        job, prefetched, ctx, device, offsets, sink, magnitudes, source),
                    # Peak memory stays a small multiple of the largest tensor (plan's estimate: 4x).
                    read_budget=largest, write_budget=max(largest, 64 << 20), hold_budget=64 << 20,
                    direct=direct,
                )
            except (QuantizationError, TensorQualityError) as error:
                raise UnitFailed(f"unit {unit.index} ({unit.file_name}): {error}") from error
        if adoptable:
            adopted = staging.adopt(unit.file_name, path, sha256=sha256)
            size, sha256 = adopted.size, adopted.sha256
        else:
            size, sha256 = _upload(fd, position, staging, unit.file_name)
    result = UnitResult(
        index=unit.index, file_name=unit.file_name, size=size, sha256=sha256, tensors=tuple(records),
        weight_map={spec.name: unit.file_name for spec in ordered},
        seconds=time.perf_counter() - started, device=str(device), node=node,
    )
    # Written last: its presence means the shard above is complete.
    staging.put_bytes(unit_record_key(unit), result.model_dump_json().encode())
    return result
