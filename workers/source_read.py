"""Reading a job's source tensor as the dense weight it means, on the worker's device.

A plain job is one ranged read. A quantized source job reads every part the planner paired with
it (weight, scales, ...), moves them to the device and dequantizes there in float32, rounding to
the model's dtype last: that dense weight is what the target quantization and every metric see.
A carried-over job (block-FP8 -> FP8_BLOCK) copies its parts' bytes unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from infra.safetensors import TensorInfo, TensorReader
from infra.safetensors.dtypes import TORCH_DTYPE
from quantizers.sources import dequantize_source
from workers.source_units import CARRIED_OVER, SourcePart
from workers.units import TensorJob

__all__ = ["read_dense", "carry_over", "source_label", "shared_absmax"]


def _read_part_tensors(job: TensorJob, reader: TensorReader) -> dict[str, torch.Tensor]:
    return {
        p.role: reader.read(
            p.file, TensorInfo(name=p.name, dtype=p.dtype, shape=p.shape, begin=p.begin, end=p.end)
        )
        for p in job.parts
    }


def read_dense(job: TensorJob, reader: TensorReader, device: torch.device) -> torch.Tensor:
    """The job's weight: as stored for a plain job (CPU), dequantized on `device` for a quantized one."""
    if job.source is None:
        info = TensorInfo(name=job.name, dtype=job.dtype, shape=job.shape, begin=job.begin, end=job.end)
        return reader.read(job.file, info)
    parts = {role: t.to(device) for role, t in _read_part_tensors(job, reader).items()}
    where = f"{job.name} (in {job.file})"
    return dequantize_source(job.source.kind, parts, name=where, block=job.source.block,
                             scheme=job.source.scheme, dtype=TORCH_DTYPE[job.dtype])


def carry_over(
    job: TensorJob, reader: TensorReader, write: Callable[[str, torch.Tensor, SourcePart], object]
) -> int:
    """Copy a carried-over job's parts unchanged under their output names; returns bytes written.
    `write` gets each part's output name, its tensor and the part (where its bytes lie)."""
    written = 0
    parts = {p.role: p for p in job.parts}
    for role, tensor in _read_part_tensors(job, reader).items():
        name = f"{job.module}.weight" if role == "weight" else f"{job.module}.weight_scale"
        write(name, tensor, parts[role])
        written += tensor.numel() * tensor.element_size()
    return written


def source_label(job: TensorJob) -> str | None:
    """What the report says about where the job's reference weight came from."""
    if job.source is None:
        return None
    if job.passthrough:
        return f"{job.source.describe()}, {CARRIED_OVER}"
    return f"{job.source.describe()}, dequantized"


def shared_absmax(
    job: TensorJob, weight: torch.Tensor, reader: TensorReader, device: torch.device,
    cache: dict[str, torch.Tensor],
) -> torch.Tensor | None:
    """Largest magnitude over the job's weight and its NVFP4 partners (None without partners).

    Magnitudes are exact in the weight's dtype; each partner's is read once per unit (`cache`).
    """
    if not job.partners:
        return None
    cache[job.name] = weight.abs().amax()
    for partner in job.partners:
        if partner.name not in cache:
            cache[partner.name] = read_dense(partner, reader, device).to(device).abs().amax()
    return torch.stack([cache[p.name].to(weight.dtype) for p in (job, *job.partners)]).amax()
