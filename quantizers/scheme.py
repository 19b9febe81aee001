"""What a quantization scheme is: the numbers that decide how one weight is stored.

A `QuantScheme` is small, frozen and serialisable, so a plan can name any scheme per tensor and
ship it to a worker. It also renders its own compressed-tensors `config_groups` entry.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from quantizers.errors import UnsupportedSchemeError

__all__ = ["QuantScheme", "Format", "Strategy"]

Format = Literal[
    "pack-quantized",
    "float-quantized",
    "nvfp4-pack-quantized",
    "mxfp4-pack-quantized",
]
Strategy = Literal["channel", "group", "block", "tensor_group"]


class QuantScheme(BaseModel):
    """How one 2-D weight is quantized and which compressed-tensors format stores it.

    `name` is the preset the user asked for (W4A16, FP8, ...); after a shape adjustment the name
    stays and the numbers change (e.g. group_size 128 -> 64), so reports can say what was done.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    format: Format
    num_bits: int
    type: Literal["int", "float"]
    symmetric: bool = True
    strategy: Strategy
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _check_consistent(self) -> QuantScheme:
        needs_group = self.strategy in ("group", "tensor_group")
        if needs_group and (self.group_size is None or self.group_size <= 0):
            raise UnsupportedSchemeError(
                f"scheme {self.name}: strategy {self.strategy!r} needs a positive group_size"
            )
        if not needs_group and self.group_size is not None:
            raise UnsupportedSchemeError(
                f"scheme {self.name}: group_size is only meaningful for group strategies"
            )
        if (self.strategy == "block") != (self.block_structure is not None):
            raise UnsupportedSchemeError(
                f"scheme {self.name}: block_structure goes with strategy 'block' and only with it"
            )
        if self.format == "pack-quantized" and (self.type != "int" or self.num_bits not in (4, 8)):
            raise UnsupportedSchemeError(
                f"scheme {self.name}: pack-quantized supports int4 and int8 "
                f"(got {self.type}{self.num_bits})"
            )
        if self.format == "float-quantized" and (self.type, self.num_bits) != ("float", 8):
            raise UnsupportedSchemeError(f"scheme {self.name}: float-quantized stores FP8 only")
        if self.format in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            if not self.symmetric:
                raise UnsupportedSchemeError(f"scheme {self.name}: FP4 formats are symmetric only")
        if self.format != "pack-quantized" and not self.symmetric:
            raise UnsupportedSchemeError(
                f"scheme {self.name}: asymmetric quantization is supported for int formats only"
            )
        return self

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight including scales, for a dimension the group divides."""
        scale_bits = {"pack-quantized": 16, "float-quantized": 16}.get(self.format, 8)
        if self.strategy in ("group", "tensor_group"):
            assert self.group_size is not None
            extra = scale_bits / self.group_size
            if not self.symmetric:
                extra += self.num_bits / self.group_size
            return self.num_bits + extra
        if self.strategy == "block":
            assert self.block_structure is not None
            return self.num_bits + scale_bits / (self.block_structure[0] * self.block_structure[1])
        return float(self.num_bits)  # one scale per row: negligible per weight

    def weight_args(self) -> dict[str, Any]:
        """The `weights` entry of a compressed-tensors config group (QuantizationArgs fields)."""
        args: dict[str, Any] = {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": self.strategy,
            "block_structure": list(self.block_structure) if self.block_structure else None,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        if self.format == "nvfp4-pack-quantized":
            args["scale_dtype"] = "torch.float8_e4m3fn"
            args["zp_dtype"] = "torch.float8_e4m3fn"
        elif self.format == "mxfp4-pack-quantized":
            args["scale_dtype"] = "torch.uint8"
            args["zp_dtype"] = "torch.uint8"
        return args

    def config_group(self, targets: list[str]) -> dict[str, Any]:
        """A `config_groups` entry for config.json: weight-only, so activations stay unquantized."""
        return {
            "targets": list(targets),
            "weights": self.weight_args(),
            "input_activations": None,
            "output_activations": None,
            "format": self.format,
        }

    def describe(self) -> str:
        """A short human label, e.g. 'int4 sym group 128'."""
        kind = f"{self.type}{self.num_bits}"
        sym = "sym" if self.symmetric else "asym"
        if self.strategy in ("group", "tensor_group"):
            detail = f"group {self.group_size}"
        elif self.strategy == "block":
            assert self.block_structure is not None
            detail = f"block {self.block_structure[0]}x{self.block_structure[1]}"
        else:
            detail = "per channel"
        return f"{kind} {sym} {detail}"
