"""The named schemes users pick (`--scheme W4A16`), named as llm-compressor presets name them.

A registry keyed by normalised name; an unknown name's error lists every valid one.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from quantizers.errors import UnknownSchemeError, UnsupportedSchemeError
from quantizers.scheme import QuantScheme
from quantizers.shapes import INT_GROUP_SIZES

__all__ = ["PRESETS", "scheme_names", "get_scheme"]

PRESETS: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        # compressed-tensors' current W8A16 preset is int8 group 128; per channel is an option.
        QuantScheme(name="W8A16", format="pack-quantized", num_bits=8, type="int",
                    strategy="group", group_size=128),
        QuantScheme(name="W4A16", format="pack-quantized", num_bits=4, type="int",
                    strategy="group", group_size=128),
        QuantScheme(name="W4A16_ASYM", format="pack-quantized", num_bits=4, type="int",
                    symmetric=False, strategy="group", group_size=128),
        QuantScheme(name="FP8", format="float-quantized", num_bits=8, type="float",
                    strategy="channel"),
        QuantScheme(name="FP8_BLOCK", format="float-quantized", num_bits=8, type="float",
                    strategy="block", block_structure=(128, 128)),
        QuantScheme(name="NVFP4A16", format="nvfp4-pack-quantized", num_bits=4, type="float",
                    strategy="tensor_group", group_size=16),
        QuantScheme(name="MXFP4A16", format="mxfp4-pack-quantized", num_bits=4, type="float",
                    strategy="group", group_size=32),
    )
}

# Names users type for the same thing.
_ALIASES = {
    "INT8": "W8A16", "W8": "W8A16", "INT4": "W4A16", "W4": "W4A16",
    "FP8_DYNAMIC": "FP8", "FP8_CHANNEL": "FP8", "NVFP4": "NVFP4A16", "MXFP4": "MXFP4A16",
}


def _normalise(name: str) -> str:
    key = name.strip().upper().replace("-", "_")
    return _ALIASES.get(key, key)


def scheme_names() -> list[str]:
    """Every preset name, in the order of the table in the README."""
    return list(PRESETS)


def get_scheme(
    name: str,
    *,
    group_size: int | None = None,
    symmetric: bool | None = None,
    per_channel: bool = False,
) -> QuantScheme:
    """The preset called `name` (case-insensitive, with aliases), with options applied.

    `group_size` and `symmetric` override the preset; `per_channel` switches a group scheme to one
    scale per output channel (W8A16 per channel, as older llm-compressor releases stored it).
    """
    key = _normalise(name)
    if key not in PRESETS:
        valid = ", ".join(scheme_names())
        # llm-compressor's W8A8 and W4A8 quantize activations as well; every scheme here is
        # weight-only, so say that rather than only list the names.
        activations = re.fullmatch(r"W\d+A(\d+)", key)
        why = (" (it quantizes activations too; quantfleet quantizes weights only, activations stay "
               "16-bit)" if activations and activations[1] != "16" else "")
        raise UnknownSchemeError(f"unknown scheme {name!r}{why}; valid schemes: {valid}")
    scheme = PRESETS[key]
    changes: dict[str, object] = {}
    if symmetric is not None and symmetric != scheme.symmetric:
        changes["symmetric"] = symmetric
    if per_channel:
        if scheme.format != "pack-quantized":
            raise UnsupportedSchemeError(f"scheme {key}: per_channel applies to int schemes only")
        changes.update(strategy="channel", group_size=None)
    elif group_size is not None:
        if scheme.strategy not in ("group", "tensor_group"):
            raise UnsupportedSchemeError(f"scheme {key} has no group size to set")
        if scheme.format != "pack-quantized" and group_size != scheme.group_size:
            raise UnsupportedSchemeError(
                f"scheme {key}: the format fixes the group size at {scheme.group_size}"
            )
        if group_size not in INT_GROUP_SIZES:
            # Any other size was taken, then undone weight by weight by the awkward-shape rule
            # (quantizers.shapes), which only steps down through these: group 7 became one scale
            # per output channel everywhere, group 256 a checkpoint vLLM's kernels cannot load.
            sizes = ", ".join(str(size) for size in INT_GROUP_SIZES)
            raise UnsupportedSchemeError(
                f"scheme {key}: group size {group_size}: int weights are stored in groups of {sizes} "
                "(what vLLM's int kernels load), or per output channel (--per-channel; per_channel: "
                "true in a recipe)"
            )
        changes["group_size"] = group_size
    if not changes:
        return scheme
    try:
        return QuantScheme.model_validate({**scheme.model_dump(), **changes})
    except ValidationError as error:
        # Surface our own error type and message rather than pydantic's wrapper.
        cause = error.errors()[0].get("ctx", {}).get("error")
        raise UnsupportedSchemeError(str(cause or error)) from error
