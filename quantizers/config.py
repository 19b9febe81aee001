"""The `quantization_config` block of config.json for a set of quantized modules, and back.

Modules quantized with the same (resolved) scheme share one config group whose targets are their
exact module names, so a checkpoint can mix schemes per tensor (awkward shapes, and later mixed
precision). The global `format` is the group's format when all agree, else "mixed-precision".

`config_groups` reads such a block back into one scheme per group, so a reader (the evaluation)
dequantizes each module with the arguments of the group that targets it, and refuses what none
of our formats stores (activation quantization, sparsity, unknown formats) instead of guessing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import ValidationError

from quantizers.errors import UnsupportedSchemeError
from quantizers.scheme import Format, QuantScheme

__all__ = ["quantization_config", "config_groups", "ConfigGroup", "COMPRESSED_TENSORS_VERSION"]

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


@dataclass(frozen=True, slots=True)
class ConfigGroup:
    """One `config_groups` entry read back: its name, the scheme its weights use, its targets."""

    name: str
    scheme: QuantScheme
    targets: tuple[str, ...]


def _group_scheme(name: str, group: dict[str, Any], default_format: Any) -> QuantScheme:
    fmt = group.get("format") or default_format
    if fmt not in get_args(Format):
        known = ", ".join(get_args(Format))
        raise UnsupportedSchemeError(f"config group {name}: format {fmt!r} is not one of {known}")
    for key in ("input_activations", "output_activations"):
        if group.get(key):
            raise UnsupportedSchemeError(f"config group {name} quantizes {key}; only weight-only "
                                         "schemes are read")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise UnsupportedSchemeError(f"config group {name} has no `weights` arguments")
    if weights.get("dynamic") or weights.get("actorder"):
        raise UnsupportedSchemeError(f"config group {name}: dynamic or act-order weights are not read")
    strategy = weights.get("strategy")
    block = weights.get("block_structure") if strategy == "block" else None
    try:
        return QuantScheme.model_validate({
            "name": name, "format": fmt, "num_bits": weights.get("num_bits"), "type": weights.get("type"),
            "symmetric": weights.get("symmetric", True), "strategy": strategy,
            "group_size": weights.get("group_size") if strategy in ("group", "tensor_group") else None,
            "block_structure": tuple(block) if isinstance(block, list) else block,
        })
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "weights"
        raise UnsupportedSchemeError(
            f"config group {name}: {field}: {first.get('msg')} (got {first.get('input')!r})"
        ) from error


def config_groups(config: dict[str, Any]) -> list[ConfigGroup]:
    """The groups of a compressed-tensors `quantization_config` (the inverse of the function above).

    UnsupportedSchemeError names the group and the field when a group is not one of the weight-only
    formats quantfleet writes (so its tensors could not be dequantized exactly).
    """
    if config.get("quant_method") != "compressed-tensors":
        raise UnsupportedSchemeError(f"quant_method {config.get('quant_method')!r} is not compressed-tensors")
    if config.get("quantization_status", "compressed") != "compressed":
        raise UnsupportedSchemeError(
            f"quantization_status {config.get('quantization_status')!r}: only compressed checkpoints are read"
        )
    if config.get("sparsity_config"):
        raise UnsupportedSchemeError("sparsity_config is set: sparse checkpoints are not read")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedSchemeError("quantization_config has no config_groups")
    result = []
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise UnsupportedSchemeError(f"config group {name} is not an object")
        targets = group.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise UnsupportedSchemeError(f"config group {name}: targets must be a list of names")
        result.append(ConfigGroup(name, _group_scheme(name, group, config.get("format")), tuple(targets)))
    return result
