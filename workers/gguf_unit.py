"""One work unit of a GGUF conversion: write one split `model-0000k-of-0000N.gguf` of the model.

The split's header (its tensors' names, types, shapes and offsets; in the first split also the
model's metadata and tokenizer) is computed from the plan before any weight is read, so the
tensors are quantized and written at their fixed offsets one at a time, in any order, while only
one source tensor is in memory; an MoE layer's experts each fill their slice of the merged tensor.
Every quantized tensor is read back through the `gguf` package's own dequantizers (an
independent implementation of the format) and compared with its original; the figures go to
the manifest and the recipe's per-tensor gates apply. Staging, the unit record and resume are
those of compressed-tensors units (`workers.convert_unit`): a staged split whose size and checksum
match its record is not redone.

Not pipelined like safetensors units (reads, kernels and writes overlap there): a split is
written tensor after tensor, and hashed in one pass over the finished file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import gguf
import torch

from infra.gguf import GGUFTensor, MetadataValue, layout, split_metadata
from infra.gguf.model import family_for, hyper_parameters
from infra.gguf.tokenizer import tokenizer_metadata
from infra.safetensors import TensorReader
from infra.storage import Storage, open_storage
from quantizers import weight_error
from quantizers.errors import QuantizationError
from quantizers.gguf import GGUF_TYPES, dequantize_gguf, quantize_gguf
from quantizers.gguf.floats import to_float_bytes
from quantizers.gguf.layout import llama_rope_permute
from workers.convert_unit import (
    _device,
    _finished,
    _scratch_file,
    _upload,
    check_reused_gates,
    unit_record_key,
)
from workers.errors import TensorQualityError, UnitFailed
from workers.records import TensorRecord, UnitContext, UnitResult
from workers.source_read import read_dense
from workers.units import TensorJob, WorkUnit

__all__ = ["convert_gguf_unit", "split_tensors", "model_metadata", "FILE_TYPES", "default_min_sqnr_db"]

# general.file_type of each scheme (informational in llama.cpp: what `llama-quantize` would call it).
FILE_TYPES = {
    "F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q5_K_M": gguf.LlamaFileType.MOSTLY_Q5_K_M,
}
_HASH_CHUNK = 16 << 20


def default_min_sqnr_db(type_name: str) -> float:
    """Below these a tensor is broken, not merely lossy (the compressed-tensors defaults by width)."""
    return 20.0 if GGUF_TYPES[type_name].bits_per_weight >= 8 else 8.0


def split_tensors(unit: WorkUnit) -> list[GGUFTensor]:
    """The GGUF tensors of a unit's split, in the order its jobs first name them."""
    seen: dict[str, GGUFTensor] = {}
    for job in unit.jobs:
        target = job.gguf
        if target is not None and target.name not in seen:
            seen[target.name] = GGUFTensor(target.name, target.dims, target.type_name, target.nbytes)
    return list(seen.values())


def _split_position(file_name: str) -> tuple[int, int]:
    """(index, count) from llama.cpp's split naming; `model.gguf` is split 0 of 1."""
    stem = file_name.removesuffix(".gguf")
    parts = stem.rsplit("-", 3)
    if len(parts) == 4 and parts[2] == "of":
        return int(parts[1]) - 1, int(parts[3])
    return 0, 1


def model_metadata(source: Storage, scheme: str, name: str) -> dict[str, MetadataValue]:
    """The first split's model metadata: architecture, hyper-parameters, file type, tokenizer."""
    config = json.loads(source.read_bytes("config.json"))
    family = family_for(config, source.uri("config.json"))
    values = hyper_parameters(config, family, name)
    values[gguf.Keys.General.FILE_TYPE] = MetadataValue(gguf.GGUFValueType.UINT32, int(FILE_TYPES[scheme]))
    values[gguf.Keys.General.QUANTIZATION_VERSION] = MetadataValue(
        gguf.GGUFValueType.UINT32, gguf.GGML_QUANT_VERSION)
    values.update(tokenizer_metadata(source, int(config["vocab_size"])))
    return values


def _header(unit: WorkUnit, ctx: UnitContext, source: Storage) -> tuple[bytes, dict[str, int], int]:
    index, count = _split_position(unit.file_name)
    metadata: dict[str, MetadataValue] = {}
    if index == 0:
        metadata.update(model_metadata(source, ctx.gguf_scheme, ctx.model_name))
    if count > 1:
        metadata.update(split_metadata(index, count, ctx.gguf_tensors))
    return layout(metadata, split_tensors(unit))


def _below_gate(job: TensorJob, ctx: UnitContext, sqnr_db: float, cosine: float) -> str | None:
    """Why a GGUF tensor's figures fail the recipe's per-tensor gate, or None."""
    assert job.gguf is not None
    type_name = job.gguf.type_name
    gate = ctx.min_sqnr_db[0] if ctx.min_sqnr_db else default_min_sqnr_db(type_name)
    if sqnr_db >= gate and cosine >= ctx.min_cosine:
        return None
    return (f"{job.name} (in {job.file}): GGUF {type_name} gives SQNR {sqnr_db:.1f} dB and cosine "
            f"{cosine:.4f}, below the gate (SQNR >= {gate:g} dB, cosine >= {ctx.min_cosine:g})")


def _convert_job(
    job: TensorJob, reader: TensorReader, ctx: UnitContext, device: torch.device, fd: int, offset: int
) -> TensorRecord:
    target = job.gguf
    assert target is not None
    where = f"{job.name} (in {job.file})"
    weight = read_dense(job, reader, device).to(device)  # a quantized source's weight, dequantized
    weight = weight.reshape(1, -1) if weight.dim() == 1 else weight.reshape(weight.shape[0], -1)
    if target.permute_heads is not None:
        weight = llama_rope_permute(weight, target.permute_heads)
    bytes_in = sum(p.end - p.begin for p in job.parts) if job.parts else job.end - job.begin
    if target.type_name == "F32":  # norms and biases, kept as they are
        packed = to_float_bytes(weight, "F32")
        os.pwrite(fd, packed.cpu().numpy().tobytes(), offset)
        return TensorRecord(name=job.name, scheme=None, bytes_in=bytes_in, bytes_out=packed.numel())
    try:
        packed = quantize_gguf(weight, target.type_name)
    except QuantizationError as error:
        raise UnitFailed(f"{where}: {error}") from error
    data = packed.cpu().contiguous().numpy()
    os.pwrite(fd, data.tobytes(), offset)
    restored = dequantize_gguf(packed, target.type_name, (weight.shape[0], weight.shape[1]))
    figures = weight_error(weight.float().cpu(), restored)
    below = _below_gate(job, ctx, figures.sqnr_db, figures.cosine)
    if below is not None:
        raise TensorQualityError(below)
    return TensorRecord(
        name=job.name, scheme=f"GGUF {target.type_name}", bytes_in=bytes_in, bytes_out=data.size,
        sqnr_db=figures.sqnr_db, relative_error=figures.relative_error, cosine=figures.cosine,
        max_abs_error=figures.max_abs_error,
    )


def _sha256(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(_HASH_CHUNK, size - offset), offset)
        if not chunk:
            raise UnitFailed(f"scratch file ended at {offset} of {size} bytes")
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def convert_gguf_unit(unit: WorkUnit, ctx: UnitContext, node: str = "local") -> UnitResult:
    """Write and stage the unit's GGUF split; returns its record (a finished unit is not redone)."""
    started = time.perf_counter()
    staging = open_storage(ctx.staging_uri)
    done = _finished(staging, unit)
    if done is not None:
        return check_reused_gates(
            done, unit, lambda job, sqnr, cosine, _: _below_gate(job, ctx, sqnr, cosine))
    source = open_storage(ctx.source_uri)
    device = _device(ctx.device)
    header, offsets, size = _header(unit, ctx, source)
    records = []
    with _scratch_file(staging, unit, ctx.scratch_dir) as (fd, path, adoptable):
        os.ftruncate(fd, size)
        os.pwrite(fd, header, 0)
        with TensorReader(source, max_concurrent_reads=ctx.read_concurrency) as reader:
            for job in unit.jobs:
                target = job.gguf
                assert target is not None
                offset = offsets[target.name] + (target.expert or 0) * target.slice_bytes
                try:
                    records.append(_convert_job(job, reader, ctx, device, fd, offset))
                except (QuantizationError, TensorQualityError) as error:
                    raise UnitFailed(f"unit {unit.index} ({unit.file_name}): {error}") from error
        os.fsync(fd)
        sha256 = _sha256(fd, size)
        if adoptable:
            adopted = staging.adopt(unit.file_name, path, sha256=sha256)
            size, sha256 = adopted.size, adopted.sha256
        else:
            size, sha256 = _upload(fd, size, staging, unit.file_name)
    result = UnitResult(
        index=unit.index, file_name=unit.file_name, size=size, sha256=sha256, tensors=tuple(records),
        weight_map={tensor.name: unit.file_name for tensor in split_tensors(unit)},
        seconds=time.perf_counter() - started, device=str(device), node=node,
    )
    staging.put_bytes(unit_record_key(unit), result.model_dump_json().encode())
    return result
