"""What a scheme becomes for one weight shape, and which tensors it stores.

Real models have dimensions a group does not divide (SmolLM2 has 576 columns; group 128 does not
divide it). Rather than fail, as llm-compressor does, quantfleet applies one documented rule:

* int group schemes: the largest supported group size (128, 64, 32) no larger than the requested
  one that divides the column count; if none does, one scale per output channel.
* FP4 schemes (the format fixes the block at 16 or 32 columns): FP8 with one scale per output
  channel, the nearest format that stores any shape (llama.cpp falls back the same way).
* FP8 channel and FP8 block schemes store any shape (blocks at the edges are partial).

Each change is reported per tensor, and the pipeline writes it as its own config group, so the
result stays loadable. Everything here works from shapes alone, so planning needs no tensor data.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from quantizers.errors import InvalidWeightError
from quantizers.scheme import QuantScheme

__all__ = ["Resolution", "StoredTensorSpec", "resolve_scheme", "stored_specs", "INT_GROUP_SIZES"]

# Group sizes the serving kernels (vLLM's Marlin/Machete) accept for int weights.
INT_GROUP_SIZES = (128, 64, 32)

_FP8_CHANNEL = QuantScheme(
    name="FP8", format="float-quantized", num_bits=8, type="float", strategy="channel"
)


class Resolution(BaseModel):
    """The scheme actually used for one weight, and why it differs from the requested one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requested: QuantScheme
    scheme: QuantScheme
    note: str | None = None

    @property
    def adjusted(self) -> bool:
        return self.note is not None


class StoredTensorSpec(BaseModel):
    """Name suffix, dtype (torch name, e.g. 'int32') and shape of one stored tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    suffix: str
    dtype: str
    shape: tuple[int, ...]


def check_weight_shape(shape: tuple[int, ...], name: str) -> None:
    """Refuse what no scheme quantizes: anything but a non-empty 2-D weight."""
    if len(shape) != 2:
        raise InvalidWeightError(
            f"{name}: only 2-D weights are quantized, this one has shape {list(shape)} "
            "(the pipeline keeps such tensors unquantized)"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise InvalidWeightError(
            f"{name}: empty weight of shape {list(shape)} cannot be quantized "
            "(the pipeline keeps such tensors unquantized)"
        )


def resolve_scheme(scheme: QuantScheme, shape: tuple[int, ...], name: str = "weight") -> Resolution:
    """Apply the awkward-shape rule above to `scheme` for a weight of `shape`."""
    check_weight_shape(shape, name)
    columns = shape[1]
    if scheme.strategy not in ("group", "tensor_group"):
        return Resolution(requested=scheme, scheme=scheme)
    assert scheme.group_size is not None
    if columns % scheme.group_size == 0:
        return Resolution(requested=scheme, scheme=scheme)
    if scheme.format == "pack-quantized":
        for size in INT_GROUP_SIZES:
            if size < scheme.group_size and columns % size == 0:
                changed = scheme.model_copy(update={"group_size": size})
                note = (
                    f"{columns} columns are not a multiple of group {scheme.group_size}: "
                    f"used group {size}"
                )
                return Resolution(requested=scheme, scheme=changed, note=note)
        changed = scheme.model_copy(update={"strategy": "channel", "group_size": None})
        note = (
            f"{columns} columns fit no group size of {list(INT_GROUP_SIZES)}: "
            "used one scale per output channel"
        )
        return Resolution(requested=scheme, scheme=changed, note=note)
    note = (
        f"{columns} columns are not a multiple of the {scheme.format} block of "
        f"{scheme.group_size}: stored as FP8 with one scale per output channel"
    )
    return Resolution(requested=scheme, scheme=_FP8_CHANNEL, note=note)


def _scale_columns(scheme: QuantScheme, columns: int) -> int:
    if scheme.strategy in ("group", "tensor_group"):
        assert scheme.group_size is not None
        return columns // scheme.group_size
    return 1


def stored_specs(
    scheme: QuantScheme, shape: tuple[int, int], weight_dtype: str
) -> list[StoredTensorSpec]:
    """The tensors compressed-tensors stores for a weight (suffixes replace `weight`).

    `scheme` must already be resolved for `shape` (see `resolve_scheme`). `weight_dtype` is the
    torch name of the original dtype ('bfloat16', 'float16', 'float32'): int and FP8 scales keep it.
    """
    rows, columns = shape
    if scheme.format == "pack-quantized":
        words = math.ceil(columns * scheme.num_bits / 32)
        specs = [
            StoredTensorSpec(suffix="weight_packed", dtype="int32", shape=(rows, words)),
            StoredTensorSpec(
                suffix="weight_scale",
                dtype=weight_dtype,
                shape=(rows, _scale_columns(scheme, columns)),
            ),
            StoredTensorSpec(suffix="weight_shape", dtype="int64", shape=(2,)),
        ]
        if not scheme.symmetric:
            zp_rows = math.ceil(rows * scheme.num_bits / 32)
            specs.append(
                StoredTensorSpec(
                    suffix="weight_zero_point",
                    dtype="int32",
                    shape=(zp_rows, _scale_columns(scheme, columns)),
                )
            )
        return specs
    if scheme.format == "float-quantized":
        if scheme.strategy == "block":
            assert scheme.block_structure is not None
            bh, bw = scheme.block_structure
            scale_shape: tuple[int, ...] = (math.ceil(rows / bh), math.ceil(columns / bw))
        else:
            scale_shape = (rows, 1)
        return [
            StoredTensorSpec(suffix="weight", dtype="float8_e4m3fn", shape=(rows, columns)),
            StoredTensorSpec(suffix="weight_scale", dtype=weight_dtype, shape=scale_shape),
        ]
    packed = StoredTensorSpec(suffix="weight_packed", dtype="uint8", shape=(rows, columns // 2))
    groups = _scale_columns(scheme, columns)
    if scheme.format == "nvfp4-pack-quantized":
        return [
            packed,
            StoredTensorSpec(suffix="weight_scale", dtype="float8_e4m3fn", shape=(rows, groups)),
            StoredTensorSpec(suffix="weight_global_scale", dtype="float32", shape=(1,)),
        ]
    return [packed, StoredTensorSpec(suffix="weight_scale", dtype="uint8", shape=(rows, groups))]
