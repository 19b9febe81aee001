"""llm-compressor recipes, read as quantfleet recipes.

Teams moving from llm-compressor keep their recipe files:

    quant_stage:
      quant_modifiers:
        QuantizationModifier:
          targets: ["Linear"]
          ignore: ["lm_head", "re:.*mlp.gate$"]
          scheme: W4A16        # or {W4A16: [targets...], W8A16: [targets...]}, or config_groups

`recipe_data` turns such a file's QuantizationModifier into the dict a `flows.recipe.Recipe`
validates: the same schemes, targets and ignores (module names, "Linear" and `re:` patterns mean
the same in both). What quantfleet would do differently is refused in one line, not approximated:
modifiers that need calibration data (GPTQ, AWQ, SmoothQuant, ...), quantized activations or KV
cache, and weight settings no scheme here stores. quantfleet's default ignores (embeddings, norms,
MoE routers) still apply: llm-compressor's "Linear" never matches an embedding or a norm, and vLLM
loads MoE routers unquantized.

Where several schemes or config groups match one module, the later one wins, as when
compressed-tensors applies groups in order. Scheme names are quantfleet's (`quantfleet schemes`),
all weight-only: activations stay 16-bit even where llm-compressor's preset of the same name (FP8,
FP8_DYNAMIC, FP8_BLOCK, NVFP4) would quantize them too, and names that mean nothing without
quantized activations (W8A8, W4A8) are refused.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_llm_compressor_recipe", "recipe_data"]

_QUANTIZATION = "QuantizationModifier"
_MODIFIER_SETTINGS = frozenset({"targets", "ignore", "scheme", "config_groups", "kv_cache_scheme"})
_GROUP_SETTINGS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
_WEIGHT_SETTINGS = frozenset({"num_bits", "type", "symmetric", "strategy", "group_size", "block_structure",
                              "dynamic", "actorder", "observer", "observer_kwargs"})
# Observers that take each group's min and max: round to nearest, compressed-tensors' own bytes.
_MINMAX_OBSERVERS = frozenset({"minmax", "memoryless_minmax", "static_minmax"})


class _Refused(ValueError):
    pass


def _modifiers(data: object, depth: int = 0) -> list[tuple[str, object]]:
    """(name, settings) of every modifier: at the top, in a modifiers group, or in a stage's."""
    found: list[tuple[str, object]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and key.endswith("Modifier"):
                found.append((key, value))
            elif depth < 2:
                found += _modifiers(value, depth + 1)
    return found


def is_llm_compressor_recipe(data: object) -> bool:
    """Whether a parsed YAML document is an llm-compressor recipe (it names a modifier)."""
    return bool(_modifiers(data))


def recipe_data(data: object, default_ignore: tuple[str, ...]) -> dict[str, Any]:
    """The quantfleet recipe (as a dict for `Recipe.model_validate`) of an llm-compressor recipe;
    ValueError naming the setting when it asks for something quantfleet does not do the same way.
    `default_ignore` (what quantfleet leaves unquantized unless told) applies to every group."""
    found = _modifiers(data)
    others = [name for name, _ in found if name != _QUANTIZATION]
    if others:
        raise _Refused(
            f"{others[0]}: needs calibration data, which quantfleet does not take (it converts without "
            f"running the model); use a {_QUANTIZATION} (round to nearest), or quantfleet's own recipe "
            "with method: search or hqq (data-free, better than round to nearest)")
    if len(found) != 1:
        raise _Refused(f"{len(found)} {_QUANTIZATION}s: quantfleet applies one")
    settings = found[0][1]
    if not isinstance(settings, dict):
        raise _Refused(f"{_QUANTIZATION}: expected its settings (targets, ignore, scheme or config_groups)")
    unknown = sorted(set(settings) - _MODIFIER_SETTINGS)
    if unknown:
        raise _Refused(f"{_QUANTIZATION}.{unknown[0]}: not a setting quantfleet reads (it reads "
                       f"{', '.join(sorted(_MODIFIER_SETTINGS - {'kv_cache_scheme'}))})")
    if settings.get("kv_cache_scheme") is not None:
        raise _Refused(f"{_QUANTIZATION}.kv_cache_scheme: quantfleet quantizes weights only; "
                       "the KV cache is quantized by the serving engine (vLLM's --kv-cache-dtype)")
    groups = _groups(settings)
    base, *later = groups
    recipe: dict[str, Any] = {**base, "ignore": _names(settings.get("ignore", []), "ignore")}
    # Overrides are matched first, the first match winning; the last group must win.
    ignored = [*recipe["ignore"], *default_ignore]
    recipe["overrides"] = [{**group, "ignore": ignored} for group in reversed(later)]
    return recipe


def _names(value: object, where: str) -> list[str]:
    """A target or ignore list (llm-compressor also takes a single name)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise _Refused(f"{_QUANTIZATION}.{where}: expected a module name or a list of them")


def _groups(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Each scheme or config group as {targets, scheme, options...}, in the recipe's order."""
    scheme, config_groups = settings.get("scheme"), settings.get("config_groups")
    if (scheme is None) == (config_groups is None):
        raise _Refused(f"{_QUANTIZATION}: give scheme or config_groups (one of them)")
    if isinstance(scheme, str):
        return [{"scheme": scheme, "targets": _names(settings.get("targets", ["Linear"]), "targets")}]
    if isinstance(scheme, dict) and scheme:
        return [{"scheme": str(name), "targets": _names(targets, f"scheme.{name}")}
                for name, targets in scheme.items()]
    if scheme is not None:
        raise _Refused(f"{_QUANTIZATION}.scheme: expected a scheme name or {{scheme: [targets]}}")
    if not isinstance(config_groups, dict) or not config_groups:
        raise _Refused(f"{_QUANTIZATION}.config_groups: expected {{group name: {{targets, weights}}}}")
    return [_config_group(str(name), group) for name, group in config_groups.items()]


def _config_group(name: str, group: object) -> dict[str, Any]:
    where = f"{_QUANTIZATION}.config_groups.{name}"
    if not isinstance(group, dict):
        raise _Refused(f"{where}: expected targets and weights")
    unknown = sorted(set(group) - _GROUP_SETTINGS)
    if unknown:
        raise _Refused(f"{where}.{unknown[0]}: not a setting quantfleet reads")
    for activations in ("input_activations", "output_activations"):
        if group.get(activations) is not None:
            raise _Refused(f"{where}.{activations}: quantfleet quantizes weights only (A16 schemes); "
                           "leave the activations to the serving engine")
    if "targets" not in group or not isinstance(group.get("weights"), dict):
        raise _Refused(f"{where}: needs targets and weights")
    return {**_weights(group["weights"], f"{where}.weights"),
            "targets": _names(group["targets"], f"config_groups.{name}.targets")}


def _weights(weights: dict[str, Any], where: str) -> dict[str, Any]:
    """A config group's weight settings as a quantfleet scheme and its options."""
    unknown = sorted(set(weights) - _WEIGHT_SETTINGS)
    if unknown:
        raise _Refused(f"{where}.{unknown[0]}: not a setting quantfleet reads")
    if weights.get("dynamic"):
        raise _Refused(f"{where}.dynamic: weights are quantized once, ahead of time (dynamic: false)")
    if weights.get("actorder") is not None:
        raise _Refused(f"{where}.actorder: a GPTQ setting, which needs calibration data")
    observer = weights.get("observer") or "minmax"
    if observer not in _MINMAX_OBSERVERS:
        # The MSE observer's grid of clipping ranges gives other bytes than any method here.
        raise _Refused(f"{where}.observer: {observer!r} is not reproduced (quantfleet reads min-max "
                       "observers); quantfleet's own data-free searches are method: search or hqq, in a "
                       "quantfleet recipe")
    kind, bits = weights.get("type", "int"), weights.get("num_bits")
    strategy, group_size = weights.get("strategy"), weights.get("group_size")
    choice: dict[str, Any] = {}
    if kind == "int" and bits in (4, 8):
        choice["scheme"] = f"W{bits}A16"
        if strategy == "channel":
            choice["per_channel"] = True
        elif strategy == "group":
            choice["group_size"] = group_size
        else:
            raise _Refused(f"{where}.strategy: {strategy!r}: int weights are stored by group or channel")
        if weights.get("symmetric") is False:
            choice["symmetric"] = False
        return choice
    stored: dict[tuple[object, object, object], str] = {
        (8, "channel", None): "FP8", (8, "block", None): "FP8_BLOCK",
        (4, "tensor_group", 16): "NVFP4A16", (4, "group", 32): "MXFP4A16"}
    scheme = stored.get((bits, strategy, group_size)) if kind == "float" else None
    if scheme is None or weights.get("symmetric") is False:
        raise _Refused(f"{where}: {kind} {bits}-bit weights by {strategy}"
                       f"{f' of {group_size}' if group_size else ''} are not stored here; float weights are "
                       "FP8 per channel or in 128x128 blocks, NVFP4 in groups of 16, MXFP4 in groups of 32")
    if scheme == "FP8_BLOCK" and list(weights.get("block_structure") or [128, 128]) != [128, 128]:
        raise _Refused(f"{where}.block_structure: FP8 blocks are 128x128 here")
    return {**choice, "scheme": scheme}
