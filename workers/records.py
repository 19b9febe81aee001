"""What crosses from a worker back to the driver: small, typed records, never tensors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from quantizers import QuantScheme
from quantizers.kernels import COMPILE_MIN_ELEMENTS

__all__ = ["UnitContext", "TensorRecord", "UnitResult"]


class UnitContext(BaseModel):
    """Everything a unit needs besides the unit itself: where to read, where to stage, how to check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: str
    source_uri: str
    staging_uri: str  # storage URI of this plan's staging prefix
    schemes: tuple[QuantScheme, ...]
    methods: tuple[str, ...] = ()  # method per scheme index (rtn, search, hqq); empty: all RTN
    min_sqnr_db: tuple[float, ...]  # gate per scheme index
    min_cosine: float = 0.9
    max_output_error: float | None = None  # gate on the probe output error (None: not gated)
    probes: int = 16  # random probe vectors per Linear for the output error (0: not measured)
    device: str = "auto"  # "auto": CUDA when this task was given a GPU, else CPU
    scratch_dir: str | None = None  # local disk for assembling shards (default: system temp)
    read_concurrency: int = 8  # ranged reads in flight per unit (S3 GETs, local preads)
    # Tensors of at least this many elements run compiled (quantizers.kernels.compile_floor_for).
    compile_min_elements: int = COMPILE_MIN_ELEMENTS
    # GGUF output (workers.gguf_unit): the type or mix asked for, the model's tensor count over
    # all splits (llama.cpp's split.tensors.count) and the name written as general.name.
    output_format: str = "compressed-tensors"
    gguf_scheme: str = ""
    gguf_tensors: int = 0
    model_name: str = ""


class TensorRecord(BaseModel):
    """One source tensor's outcome, as it goes into the manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    scheme: str | None  # described resolved scheme, None when copied unchanged
    note: str | None = None
    bytes_in: int
    bytes_out: int
    sqnr_db: float | None = None
    relative_error: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    output_error: float | None = None  # ||W x - W' x|| / ||W x|| on fixed random probes
    # For a quantized source: its format and whether it was dequantized (metrics then compare
    # against the dequantized source) or carried over exactly.
    source: str | None = None
    # Methods other than RTN: the method and its cost in passes over the weight (RTN: 1). A pass
    # count rather than seconds, so a resumed run's manifest equals an uninterrupted one's.
    # Left out of the JSON when unset, so RTN manifests stay byte-identical to earlier ones.
    method: str | None = Field(default=None, exclude_if=lambda v: v is None)
    method_passes: int | None = Field(default=None, exclude_if=lambda v: v is None)


class UnitResult(BaseModel):
    """A converted (or found already converted) output shard."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    file_name: str
    size: int
    sha256: str
    tensors: tuple[TensorRecord, ...]
    weight_map: dict[str, str]  # output tensor name -> file name
    seconds: float  # wall time of the unit where it ran (a reused unit keeps its first run's)
    device: str
    node: str = "local"  # the Ray node that ran it (IP/id), for the manifest and report
    reused: bool = False
