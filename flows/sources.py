"""Recognise a quantized source checkpoint and pair each quantized weight with its stored parts.

Planning reads headers only, so the source's format comes from `config.json`'s
`quantization_config` and the tensors' names, dtypes and shapes:

* block-FP8 (DeepSeek-V3/R1, Kimi-K2: `quant_method: fp8`, `weight_block_size`): an E4M3
  `M.weight` and its float32 `M.weight_scale_inv`, one scale per tile.
* compressed-tensors (what quantfleet and llm-compressor write): `M.weight_packed`/`M.weight`,
  `M.weight_scale`, ... described by the config group that targets `M`.
* gpt-oss MXFP4 (`quant_method: mxfp4`): uint8 `P_blocks` (E, rows, G, 16) and E8M0 `P_scales`
  (E, rows, G) for each fused expert parameter `P` (`experts.gate_up_proj`, `experts.down_proj`).

Every quantized weight becomes one dense `SourceTensor` that names all its parts, wherever they
are (an index may put a weight and its scale in different files); a scale that is missing,
mis-shaped or of an unknown format is refused here, with one line naming the tensor, before any
work starts. Fused 3-D expert tensors (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I]) are split into per-expert 2-D weights under the per-expert names transformers and
vLLM load (`experts.{e}.gate_proj.weight`, ...): each expert is its own matrix, and each slice is
a contiguous byte range, so workers read experts like any other weight.

gpt-oss is the exception: transformers (5.x) loads its experts only fused, in its own layout
([E, H, 2I] with gate and up interleaved, [E, I, H]), and has no per-expert names for them, so a
gpt-oss source's fused experts stay fused: an MXFP4 source's are dequantized into that layout
(the model's dtype, as transformers' own MXFP4 loader does) and a bf16 source's are copied; the
target scheme applies to the 2-D Linears (attention). See README "Quantized sources".
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.safetensors import DTYPE_SIZE, Catalog, CatalogEntry
from quantizers import QuantizationError, QuantScheme
from quantizers.shapes import stored_specs
from quantizers.sources.block_fp8 import scale_shape
from quantizers.sources.compressed import logical_shape
from workers.source_units import SourceFormat, SourcePart

__all__ = ["SourceError", "SourceTensor", "SourceSummary", "read_source", "dense_bytes", "DENSE_DTYPES"]

# config.json's dtype -> the safetensors dtype a dequantized weight is rounded to (what the source
# means: DeepSeek's own and transformers' FP8 dequantization produce the model's dtype).
DENSE_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_FLOAT_SCALES = ("F32", "BF16", "F16")
_CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_global_scale")
# Parameters of the source scheme's activation and KV-cache quantization (static FP8 or int8
# activations, NVFP4's activation global scale, KV-cache scales). The result quantizes weights
# only, so they describe nothing in it: copied, they are parameters vLLM's weight-only layers
# do not have.
_CT_ACTIVATION_SUFFIXES = frozenset({"input_scale", "input_zero_point", "input_global_scale", "output_scale",
                                     "output_zero_point"})
_KV_CACHE_SUFFIXES = frozenset({"k_scale", "v_scale", "q_scale", "k_zero_point", "v_zero_point"})
_FUSED = re.compile(r"(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
# Architectures whose fused experts transformers loads only fused (no per-expert checkpoint names).
KEEP_FUSED = frozenset({"gpt_oss"})


class SourceError(ValueError):
    """A source this tool cannot convert (unknown quantization, missing or mis-shaped scale, ...)."""


@dataclass(frozen=True, slots=True)
class SourceTensor:
    """One tensor as the plan sees it: dense dtype and shape, and where its bytes are."""

    name: str
    file: str
    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...]
    source: SourceFormat | None = None
    parts: tuple[SourcePart, ...] = ()


class SourceSummary(BaseModel):
    """What `quantfleet plan` and the manifest say about the source's own quantization."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str  # e.g. "block-FP8 128x128", "compressed-tensors", "bf16"
    quantized: bool
    dense_dtype: str
    fused_experts_split: int = 0  # 3-D expert tensors split into per-expert weights
    # Activation and KV-cache scales of the source's own scheme, not copied (left out when none,
    # so manifests of other sources keep their bytes).
    activation_scales_dropped: int = Field(default=0, exclude_if=lambda v: v == 0)


def _part(role: str, entry: CatalogEntry) -> SourcePart:
    info = entry.info
    return SourcePart(role, info.name, entry.file, info.begin, info.end, info.dtype, info.shape)


def _dense_dtype(config: dict[str, Any]) -> str:
    named = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return DENSE_DTYPES.get(str(named).removeprefix("torch."), "BF16")


def _where(catalog: Catalog, entry: CatalogEntry) -> str:
    return f"{entry.info.name} (in {entry.file})"


# Dense weights by the name of their main stored part, and the names of every part they use.
Found = tuple[dict[str, SourceTensor], set[str]]


def _block_fp8(catalog: Catalog, qconfig: dict[str, Any], dense: str) -> Found:
    block_size = qconfig.get("weight_block_size")
    if not (isinstance(block_size, list) and len(block_size) == 2 and all(isinstance(b, int) and b > 0
                                                                          for b in block_size)):
        raise SourceError(
            f"{catalog.uri}/config.json: quant_method 'fp8' with weight_block_size {block_size!r}; "
            "quantfleet reads block-FP8 sources (weight_block_size [rows, columns], e.g. [128, 128])"
        )
    block = (block_size[0], block_size[1])
    fmt = SourceFormat("block-fp8", block=block)
    found: dict[str, SourceTensor] = {}
    used: set[str] = set()
    for name, entry in catalog.tensors.items():
        if name.endswith(".weight_scale_inv"):
            if name.removesuffix("_scale_inv") not in catalog.tensors:
                raise SourceError(f"{_where(catalog, entry)}: a block-FP8 scale without its weight "
                                  f"{name.removesuffix('_scale_inv')!r}")
            continue
        if entry.info.dtype != "F8_E4M3":
            continue
        info = entry.info
        scale_entry = catalog.tensors.get(f"{name}_scale_inv")
        if len(info.shape) != 2:
            raise SourceError(f"{_where(catalog, entry)}: a block-FP8 weight must be 2-D, this one has shape "
                              f"{list(info.shape)}")
        expected = scale_shape((info.shape[0], info.shape[1]), block)
        if scale_entry is None:
            raise SourceError(
                f"{_where(catalog, entry)}: float8_e4m3fn weight without its scale {name}_scale_inv "
                f"(expected float32 of shape {list(expected)}, one per {block[0]}x{block[1]} tile)"
            )
        scale = scale_entry.info
        if scale.shape != expected or scale.dtype not in _FLOAT_SCALES:
            raise SourceError(
                f"{_where(catalog, scale_entry)}: {scale.dtype} of shape {list(scale.shape)}, expected "
                f"float32 of shape {list(expected)} (one scale per {block[0]}x{block[1]} tile of the "
                f"{info.shape[0]}x{info.shape[1]} weight {name})"
            )
        found[name] = SourceTensor(
            name, entry.file, info.begin, info.end, dense, info.shape, fmt,
            (_part("weight", entry), _part("weight_scale_inv", scale_entry)),
        )
        used.update((name, scale.name))
    return found, used


def _mxfp4_blocks(catalog: Catalog, dense: str) -> Found:
    """gpt-oss's `P_blocks`/`P_scales` pairs, as the fused parameter `P` in transformers' layout."""
    fmt = SourceFormat("mxfp4-blocks")
    found: dict[str, SourceTensor] = {}
    used: set[str] = set()
    for name, entry in catalog.tensors.items():
        if name.endswith("_scales") and f"{name.removesuffix('_scales')}_blocks" not in catalog.tensors:
            raise SourceError(f"{_where(catalog, entry)}: MXFP4 scales without their blocks "
                              f"{name.removesuffix('_scales')}_blocks")
        if not name.endswith("_blocks"):
            continue
        info = entry.info
        base = name.removesuffix("_blocks")
        if info.dtype != "U8" or len(info.shape) not in (3, 4) or info.shape[-1] != 16:
            raise SourceError(f"{_where(catalog, entry)}: {info.dtype} of shape {list(info.shape)}, expected "
                              "MXFP4 blocks: uint8 ([experts,] rows, groups, 16), two E2M1 values a byte")
        expected = list(info.shape[:-1])
        scale_entry = catalog.tensors.get(f"{base}_scales")
        if scale_entry is None:
            raise SourceError(f"{_where(catalog, entry)}: MXFP4 blocks without their scales {base}_scales "
                              f"(expected uint8 of shape {expected}, one E8M0 exponent per 32 values)")
        scale = scale_entry.info
        if scale.dtype != "U8" or list(scale.shape) != expected:
            raise SourceError(f"{_where(catalog, scale_entry)}: {scale.dtype} of shape {list(scale.shape)}, "
                              f"expected uint8 of shape {expected} (one E8M0 exponent per 32 values of "
                              f"{name})")
        *lead, rows, groups, _ = info.shape
        # 3-D experts come out transposed, as transformers holds them ([E, in, out]); 2-D stay (out, in).
        shape = (*lead, groups * 32, rows) if lead else (rows, groups * 32)
        found[name] = SourceTensor(base, entry.file, info.begin, info.end, dense, tuple(shape), fmt,
                                   (_part("blocks", entry), _part("scales", scale_entry)))
        used.update((name, scale.name))
    return found, used


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], module) is not None
    return target == "Linear" or module == target or module.endswith("." + target)


def _ct_scheme(
    catalog: Catalog, group_name: str, group: dict[str, Any], default_format: str | None
) -> QuantScheme:
    weights = group.get("weights") or {}
    fmt = group.get("format") or default_format
    try:
        block = weights.get("block_structure")
        return QuantScheme.model_validate({
            "name": f"source {group_name}", "format": fmt, "num_bits": weights.get("num_bits"),
            "type": weights.get("type"), "symmetric": weights.get("symmetric", True),
            "strategy": weights.get("strategy"), "group_size": weights.get("group_size"),
            "block_structure": tuple(block) if block else None,
        })
    except (ValidationError, QuantizationError, TypeError) as error:
        detail = str(error).strip().splitlines()[0]
        raise SourceError(
            f"{catalog.uri}/config.json: compressed-tensors config group {group_name!r} (format {fmt!r}, "
            f"weights {weights!r}) is not a format quantfleet reads ({detail})"
        ) from error


def _compressed(catalog: Catalog, qconfig: dict[str, Any], dense: str) -> Found:
    groups = qconfig.get("config_groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise SourceError(f"{catalog.uri}/config.json: compressed-tensors 'config_groups' must map group "
                          f"names to objects, not {reprlib.repr(groups)}")
    schemes = [(name, group.get("targets") or [], group) for name, group in groups.items()]
    modules: dict[str, dict[str, CatalogEntry]] = {}
    for name, entry in catalog.tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix in _CT_SUFFIXES or (suffix == "weight" and entry.info.dtype == "F8_E4M3"):
            modules.setdefault(module, {})[suffix] = entry
    found: dict[str, SourceTensor] = {}
    used: set[str] = set()
    if qconfig.get("kv_cache_scheme"):
        used.update(name for name in catalog.tensors if name.rpartition(".")[2] in _KV_CACHE_SUFFIXES)
    resolved: dict[str, QuantScheme] = {}
    for module, stored in sorted(modules.items()):
        if set(stored) <= {"weight_scale"} and f"{module}.weight" in catalog.tensors:
            continue  # a dense weight beside some other scale (e.g. an activation-free leftover)
        first = next(iter(stored.values()))
        group = next((g for g in schemes if any(_matches(t, module) for t in g[1])), None)
        if group is None:
            raise SourceError(f"{_where(catalog, first)}: stored quantized, but no compressed-tensors "
                              f"config group targets module {module!r}")
        scheme = resolved.get(group[0])
        if scheme is None:
            scheme = resolved[group[0]] = _ct_scheme(catalog, group[0], group[2], qconfig.get("format"))
        shapes = {suffix: e.info.shape for suffix, e in stored.items()}
        shape = logical_shape(scheme, shapes)
        main = "weight" if scheme.format == "float-quantized" else "weight_packed"
        if shape is None or main not in stored:
            raise SourceError(f"{_where(catalog, first)}: {scheme.format} module {module!r} has no {main} "
                              f"(found {sorted(stored)})")
        for spec in stored_specs(scheme, shape, "float32"):
            got = stored.get(spec.suffix)
            if got is None or got.info.shape != spec.shape:
                what = "missing" if got is None else f"of shape {list(got.info.shape)}"
                raise SourceError(
                    f"{catalog.uri}: {module}.{spec.suffix} is {what}, expected shape {list(spec.shape)} "
                    f"for {scheme.describe()} ({scheme.format}) of a {shape[0]}x{shape[1]} weight"
                )
        used.update(name for suffix in _CT_ACTIVATION_SUFFIXES
                    if (name := f"{module}.{suffix}") in catalog.tensors)
        entry = stored[main]
        parts = tuple(_part(suffix, e) for suffix, e in sorted(stored.items()))
        found[entry.info.name] = SourceTensor(
            f"{module}.weight", entry.file, entry.info.begin, entry.info.end, dense, shape,
            SourceFormat("compressed-tensors", scheme=scheme), parts,
        )
        used.update(e.info.name for e in stored.values())
    return found, used


def _split_fused(entry: CatalogEntry) -> Iterator[SourceTensor] | None:
    """Per-expert 2-D weights of a fused 3-D expert tensor, or None if it is not one."""
    info = entry.info
    match = _FUSED.fullmatch(info.name)
    if match is None or len(info.shape) != 3 or info.dtype not in DENSE_DTYPES.values():
        return None
    experts, rows, columns = info.shape
    row_bytes = columns * DTYPE_SIZE[info.dtype]
    prefix, kind = match["prefix"], match["kind"]
    if kind == "gate_up_proj" and rows % 2:
        return None
    halves = (("gate_proj", 0, rows // 2), ("up_proj", rows // 2, rows)) if kind == "gate_up_proj" \
        else (("down_proj", 0, rows),)

    def slices() -> Iterator[SourceTensor]:
        for e in range(experts):
            base = info.begin + e * rows * row_bytes
            for proj, start, stop in halves:
                yield SourceTensor(f"{prefix}.{e}.{proj}.weight", entry.file, base + start * row_bytes,
                                   base + stop * row_bytes, info.dtype, (stop - start, columns))

    return slices()


def read_source(config: dict[str, Any] | None, catalog: Catalog) -> tuple[SourceSummary, list[SourceTensor]]:
    """The source's format and its tensors as the plan converts them, in file then offset order."""
    config = config or {}
    qconfig = config.get("quantization_config") or None
    dense = _dense_dtype(config)
    quantized: dict[str, SourceTensor] = {}
    used: set[str] = set()
    label = "unquantized"
    if qconfig is not None:
        method = qconfig.get("quant_method")
        if method == "fp8":
            quantized, used = _block_fp8(catalog, qconfig, dense)
            block = qconfig["weight_block_size"]
            label = f"block-FP8 {block[0]}x{block[1]}"
        elif method == "compressed-tensors":
            quantized, used = _compressed(catalog, qconfig, dense)
            label = f"compressed-tensors ({qconfig.get('format', 'mixed')})"
        elif method == "mxfp4":
            quantized, used = _mxfp4_blocks(catalog, dense)
            label = "MXFP4 blocks (gpt-oss)"
        else:
            raise SourceError(
                f"{catalog.uri}/config.json: the source is quantized with quant_method {method!r}, which "
                "quantfleet does not read (it reads block-FP8 'fp8' with weight_block_size, "
                "'compressed-tensors' and gpt-oss 'mxfp4' sources)"
            )
    tensors: list[SourceTensor] = []
    split = 0
    keep_fused = config.get("model_type") in KEEP_FUSED
    for entry in sorted(catalog.tensors.values(), key=lambda e: (e.file, e.info.begin)):
        name = entry.info.name
        if name in quantized:
            tensors.append(quantized[name])
            continue
        if name in used:
            continue  # a scale or other part, consumed by its weight above
        experts = None if keep_fused else _split_fused(entry)
        if experts is not None:
            tensors.extend(experts)
            split += 1
            continue
        info = entry.info
        tensors.append(SourceTensor(name, entry.file, info.begin, info.end, info.dtype, info.shape))
    if qconfig is not None:
        # Parts of a weight may sit in other files: keep the plan's file-then-offset reading order.
        tensors.sort(key=lambda t: (t.file, t.begin))
    dropped = sum(1 for name in used
                  if name.rpartition(".")[2] in _CT_ACTIVATION_SUFFIXES | _KV_CACHE_SUFFIXES)
    summary = SourceSummary(format=label, quantized=qconfig is not None, dense_dtype=dense,
                            fused_experts_split=split, activation_scales_dropped=dropped)
    return summary, tensors


def dense_bytes(tensor: SourceTensor) -> int:
    """Bytes of the weight once dequantized in float32 (what a worker holds at once)."""
    return math.prod(tensor.shape) * 4 if tensor.source is not None else tensor.end - tensor.begin
