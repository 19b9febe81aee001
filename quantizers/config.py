"""The `quantization_config` block of config.json for a set of quantized modules.

Modules quantized with the same (resolved) scheme share one config group whose targets are their
exact module names, so a checkpoint can mix schemes per tensor (awkward shapes, and later mixed
precision). The global `format` is the group's format when all agree, else "mixed-precision".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from quantizers.scheme import QuantScheme

__all__ = ["quantization_config", "COMPRESSED_TENSORS_VERSION"]

# The compressed-tensors release whose layouts the tests check byte for byte.
COMPRESSED_TENSORS_VERSION = "0.20.0"


def quantization_config(
    modules: Iterable[tuple[str, QuantScheme]],
    ignore: Iterable[str] = (),
) -> dict[str, Any]:
    """`modules` are (module name without `.weight`, resolved scheme) pairs."""
    by_scheme: dict[QuantScheme, list[str]] = {}
    for module, scheme in modules:
        by_scheme.setdefault(scheme, []).append(module)
    groups: dict[str, Any] = {}
    formats = []
    # Largest group first so group_0 is the main scheme.
    ordered = sorted(by_scheme.items(), key=lambda item: (-len(item[1]), item[0].describe()))
    for index, (scheme, names) in enumerate(ordered):
        groups[f"group_{index}"] = scheme.config_group(sorted(names))
        formats.append(scheme.format)
    fmt = formats[0] if len(set(formats)) == 1 else "mixed-precision"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(set(ignore)),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }
