"""The one table of safetensors dtypes: byte size, torch dtype, and header sort rank."""

from __future__ import annotations

from types import MappingProxyType

import torch

__all__ = ["DTYPE_RANK", "DTYPE_SIZE", "TORCH_DTYPE", "dtype_name_of"]

# name -> (bytes per element, torch dtype). Data is little-endian, like every supported host.
_TABLE: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U64": (8, torch.uint64),
    "U32": (4, torch.uint32),
    "U16": (2, torch.uint16),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2),
    "F8_E8M0": (1, torch.float8_e8m0fnu),
}

DTYPE_SIZE = MappingProxyType({name: size for name, (size, _) in _TABLE.items()})
TORCH_DTYPE = MappingProxyType({name: dt for name, (_, dt) in _TABLE.items()})
_NAME_OF = {dt: name for name, dt in TORCH_DTYPE.items()}

# The order of safetensors' Rust `Dtype` enum (0.8). save_file sorts tensors by this rank,
# descending, then by name; the streaming writer must do the same to produce identical bytes.
_ENUM_ORDER = (
    "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64"
).split()
DTYPE_RANK = MappingProxyType({name: i for i, name in enumerate(_ENUM_ORDER) if name in _TABLE})


def dtype_name_of(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; ValueError listing the supported ones otherwise."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        valid = ", ".join(str(d) for d in _NAME_OF)
        raise ValueError(f"torch dtype {dtype} has no safetensors name; supported: {valid}") from None
