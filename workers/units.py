"""A work unit: one output shard and the source tensors whose outputs it holds.

Defined here, in the workers layer, because a worker executes it; `flows.plan` builds them.
Small and frozen, so a unit crosses to a Ray worker as a few keys and byte ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel, ConfigDict

from quantizers import QuantScheme, stored_specs
from workers.gguf_units import GGUFTarget
from workers.source_units import SourceFormat, SourcePart

__all__ = ["TensorJob", "WorkUnit", "output_specs", "SAFETENSORS_TO_TORCH"]

_TORCH_TO_SAFETENSORS = {
    "bfloat16": "BF16", "float16": "F16", "float32": "F32", "int32": "I32", "int64": "I64",
    "uint8": "U8", "int8": "I8", "float8_e4m3fn": "F8_E4M3",
}
SAFETENSORS_TO_TORCH = {v: k for k, v in _TORCH_TO_SAFETENSORS.items()}


@dataclass(frozen=True, slots=True)
class TensorJob:
    """One source tensor: where it is, and the scheme it gets (index into Plan.schemes) or None.

    A slotted dataclass rather than a pydantic model: a plan holds a million of these, and
    building them must cost about a microsecond each. WorkUnit (pydantic) carries them.
    """

    name: str
    file: str  # storage key relative to the source root
    begin: int  # absolute byte offsets in the file
    end: int
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    scheme: int | None = None
    note: str | None = None  # what the awkward-shape rule changed, if anything
    # A quantized source weight: its format and every stored part (then dtype and shape above are
    # the dense weight's); `passthrough` copies the parts unchanged (block-FP8 -> FP8_BLOCK).
    source: SourceFormat | None = None
    parts: tuple[SourcePart, ...] = ()
    passthrough: bool = False
    # NVFP4 partners fused at inference (q/k/v, gate/up): their global scale comes from the
    # largest magnitude of all of them, so the worker reads these too (in whichever unit they are).
    partners: tuple[TensorJob, ...] = ()
    # GGUF output: the GGUF tensor this job writes (scheme is then None; see workers.gguf_units).
    gguf: GGUFTarget | None = None

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


class WorkUnit(BaseModel):
    """One output shard: the jobs whose outputs it holds, with size and memory estimates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    file_name: str
    jobs: tuple[TensorJob, ...]
    bytes_in: int
    bytes_out: int
    memory_bytes: int


OutputSpec = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape)


def output_specs(job: TensorJob, schemes: tuple[QuantScheme, ...]) -> list[OutputSpec]:
    """(name, safetensors dtype, shape) of every tensor a job writes."""
    if job.scheme is None:
        return [(job.name, job.dtype, job.shape)]
    if job.passthrough:  # the source's fp8 weight and tile scales, under compressed-tensors names
        return [(f"{job.module}.{'weight' if p.role == 'weight' else 'weight_scale'}", p.dtype, p.shape)
                for p in job.parts]
    return [
        (f"{job.module}.{suffix}", dtype, shape)
        for suffix, dtype, shape in _stored(schemes[job.scheme], job.shape, job.dtype)
    ]


@lru_cache(maxsize=4096)
def _stored(scheme: QuantScheme, shape: tuple[int, ...], dtype: str) -> tuple[OutputSpec, ...]:
    # Many tensors share a shape (a million MoE experts have a handful): compute each once.
    specs = stored_specs(scheme, (shape[0], shape[1]), SAFETENSORS_TO_TORCH[dtype])
    return tuple((s.suffix, _TORCH_TO_SAFETENSORS[s.dtype], s.shape) for s in specs)


