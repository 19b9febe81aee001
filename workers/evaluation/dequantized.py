"""Load a compressed-tensors checkpoint as a dense transformers model, dequantized by quantfleet.

Why not transformers' own path (`CompressedTensorsConfig(dequantize=True)`): it applies one config
group's arguments to the tensors of another, so a checkpoint whose layers got different group
sizes fails to load. That is exactly what the awkward-shape rule writes for SmolLM2-like models
(576-wide projections in a group-64 config group, the 1536-wide down_proj in a group-128 one).
quantfleet has an exact dequantizer for every format it writes, the one its own verification
uses, so evaluating through it measures exactly the weights the conversion checked.

How: the architecture is built from the checkpoint's config without its `quantization_config`,
and transformers' loader is handed a state dict of lazy entries. A dense tensor is read when the
loader asks for it; a quantized module's `weight` is its stored tensors, read and dequantized with
the scheme of the config group that targets it, when the loader asks for it. The loader's own
renames and fusions (MoE experts into one 3-D parameter) apply as for any checkpoint, and no dense
copy of the whole model exists beside the model. Before anything is loaded, every quantized
module's stored tensors are checked against its scheme (names, dtypes, shapes) from the headers,
so a damaged checkpoint fails with one line naming the tensor.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infra.errors import InfraError
from infra.safetensors import TORCH_DTYPE, CatalogEntry, TensorReader, build_catalog
from infra.storage import Storage, open_storage
from quantizers import ConfigGroup, QuantizationError, QuantScheme, config_groups, dequantize, stored_specs
from workers.evaluation.errors import EvaluationError

__all__ = ["QuantizedModule", "is_compressed", "load_dequantized", "quantized_modules"]

_log = logging.getLogger(__name__)

# Suffixes only a quantized module stores (float-quantized keeps `weight`, with a `weight_scale`).
_QUANTIZED_SUFFIXES = frozenset(
    {"weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape"}
)


@dataclass(frozen=True, slots=True)
class QuantizedModule:
    """One quantized Linear of a checkpoint: its scheme, its config group and its stored tensors."""

    module: str
    group: str
    scheme: QuantScheme
    shape: tuple[int, int]
    stored: dict[str, CatalogEntry]  # suffix ("weight_packed", ...) -> where it lives


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path}/config.json: cannot read: {error}") from error
    if not isinstance(config, dict):
        raise EvaluationError(f"{path}/config.json: not a JSON object")
    return config


def is_compressed(path: Path) -> bool:
    """Whether the checkpoint folder declares a compressed-tensors `quantization_config`."""
    quantization = _config(path).get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "compressed-tensors"


def _is_class_name(target: str) -> bool:
    # compressed-tensors targets are module names, `re:` regexes or class names ("Linear"); only
    # names are in a checkpoint, so a CamelCase target without dots is taken for a class name and
    # matches every module that has quantized tensors.
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


def _group_of(module: str, groups: list[ConfigGroup], where: str) -> ConfigGroup | None:
    """The group targeting `module`, with compressed-tensors' precedence: name, regex, class."""
    tests: tuple[Callable[[str], bool], ...] = (
        lambda t: t == module,
        lambda t: t.startswith("re:") and re.match(t[3:], module) is not None,
        _is_class_name,
    )
    for test in tests:
        matched = [g for g in groups if any(test(t) for t in g.targets)]
        if len(matched) > 1:
            names = ", ".join(g.name for g in matched)
            raise EvaluationError(f"{where}: {module} is targeted by several config groups ({names})")
        if matched:
            return matched[0]
    return None


def _torch_name(entry: CatalogEntry) -> str:
    return str(TORCH_DTYPE[entry.info.dtype]).removeprefix("torch.")


def _module_shape(
    module: str,
    scheme: QuantScheme,
    stored: dict[str, CatalogEntry],
    read: Callable[[CatalogEntry], torch.Tensor],
    where: str,
) -> tuple[int, int]:
    """(out, in) of the dense weight, from the tensor that records it in this format."""
    base = {"pack-quantized": "weight_shape", "float-quantized": "weight"}.get(scheme.format, "weight_packed")
    entry = stored.get(base)
    if entry is None:
        raise EvaluationError(f"{where}: {module}.{base} is missing ({scheme.format} stores it)")
    if base == "weight_shape":
        if entry.info.shape != (2,) or entry.info.dtype != "I64":
            raise EvaluationError(f"{where}: {module}.weight_shape should be int64 [2], not "
                                  f"{_torch_name(entry)} {list(entry.info.shape)}")
        rows, columns = (int(v) for v in read(entry).tolist())
    elif len(entry.info.shape) != 2:
        raise EvaluationError(f"{where}: {module}.{base} should be 2-D, not {list(entry.info.shape)}")
    else:
        rows, columns = entry.info.shape
        if base == "weight_packed":
            columns *= 2  # two E2M1 values per byte
    if rows <= 0 or columns <= 0:
        raise EvaluationError(f"{where}: {module} records an empty weight shape [{rows}, {columns}]")
    if scheme.group_size and columns % scheme.group_size:
        raise EvaluationError(f"{where}: {module} has {columns} columns, which {scheme.name}'s group "
                              f"size {scheme.group_size} does not divide")
    return rows, columns


def _check_stored(module: str, scheme: QuantScheme, group: str, shape: tuple[int, int],
                  stored: dict[str, CatalogEntry], dense: CatalogEntry | None, where: str) -> None:
    """Every tensor the scheme stores is there with its dtype and shape, and nothing else."""
    scale = stored.get("weight_scale")
    if scale is None:
        what = f"{group}: {scheme.describe()}, {scheme.format}"
        raise EvaluationError(f"{where}: {module}.weight_scale is missing ({what})")
    # int and FP8 scales keep the original weight's dtype; the FP4 formats fix theirs.
    specs = stored_specs(scheme, shape, _torch_name(scale))
    expected = {spec.suffix for spec in specs}
    for spec in specs:
        entry = stored.get(spec.suffix)
        if entry is None:
            raise EvaluationError(f"{where}: {module}.{spec.suffix} is missing "
                                  f"({group}: {scheme.describe()}, {scheme.format})")
        if (_torch_name(entry), entry.info.shape) != (spec.dtype, spec.shape):
            raise EvaluationError(
                f"{where}: {module}.{spec.suffix} is {_torch_name(entry)} {list(entry.info.shape)}, "
                f"but {group} ({scheme.describe()}, {scheme.format}) stores {spec.dtype} {list(spec.shape)} "
                f"for a [{shape[0]}, {shape[1]}] weight"
            )
    extra = sorted(set(stored) - expected)
    if extra or (dense is not None and "weight" not in expected):
        names = ", ".join(f"{module}.{s}" for s in (extra or ["weight"]))
        raise EvaluationError(f"{where}: {names} should not be there: {group} ({scheme.describe()}, "
                              f"{scheme.format}) stores {', '.join(sorted(expected))}")


def _read_checkpoint(
    path: Path, storage: Storage
) -> tuple[dict[str, CatalogEntry], dict[str, QuantizedModule]]:
    """Every tensor of the checkpoint (from the headers), and its quantized modules, checked."""
    where = str(path)
    quantization = _config(path).get("quantization_config") or {}
    try:
        groups = config_groups(quantization)
    except QuantizationError as error:
        raise EvaluationError(f"{where}: cannot dequantize this checkpoint: {error}") from error
    try:
        tensors = build_catalog(storage).tensors
    except InfraError as error:
        raise EvaluationError(f"{where}: {error}") from error
    by_module: dict[str, dict[str, CatalogEntry]] = {}
    for name, entry in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix in _QUANTIZED_SUFFIXES:
            by_module.setdefault(module, {})[suffix] = entry
    # Modules a group names exactly are quantized even if (damaged) they lost every stored tensor.
    for group in groups:
        for target in group.targets:
            if not target.startswith("re:") and not _is_class_name(target):
                by_module.setdefault(target, {})
    modules = {}
    with TensorReader(storage) as reader:
        def read(entry: CatalogEntry) -> torch.Tensor:
            return reader.read(entry.file, entry.info)

        for module, stored in sorted(by_module.items()):
            owner = _group_of(module, groups, where)
            if owner is None:
                suffixes = ", ".join(sorted(stored))
                raise EvaluationError(f"{where}: {module} has quantized tensors ({suffixes}) "
                                      "but no config group targets it")
            dense = tensors.get(f"{module}.weight")
            if owner.scheme.format == "float-quantized" and dense is not None:
                stored = {**stored, "weight": dense}
            if not stored:
                raise EvaluationError(f"{where}: {owner.name} targets {module}, which has no tensors "
                                      "in the checkpoint")
            shape = _module_shape(module, owner.scheme, stored, read, where)
            _check_stored(module, owner.scheme, owner.name, shape, stored, dense, where)
            modules[module] = QuantizedModule(module, owner.name, owner.scheme, shape, stored)
    return tensors, modules


def quantized_modules(path: Path) -> dict[str, QuantizedModule]:
    """Every quantized module of the checkpoint folder at `path`, checked against its config group."""
    return _read_checkpoint(path, open_storage(str(path)))[1]


class _Lazy:
    """A state-dict entry that transformers' loader materializes with `entry[...]`, as it does
    the slices of the safetensors files it opens itself."""

    __slots__ = ("_load",)

    def __init__(self, load: Callable[[], torch.Tensor]) -> None:
        self._load = load

    def __getitem__(self, index: object) -> torch.Tensor:
        if index is not Ellipsis:
            raise TypeError("a lazy checkpoint entry is only read whole, with entry[...]")
        return self._load()


class _Entries:
    """The lazy state dict of one checkpoint; records the first read or dequantization failure
    (the loader runs entries in threads and reports failures as a multi-line table)."""

    def __init__(self, reader: TensorReader, where: str) -> None:
        self.reader = reader
        self.where = where
        self.failure: EvaluationError | None = None
        self._lock = threading.Lock()

    def _guarded(self, name: str, load: Callable[[], torch.Tensor]) -> _Lazy:
        def run() -> torch.Tensor:
            try:
                return load()
            except (InfraError, QuantizationError, RuntimeError, ValueError) as error:
                with self._lock:
                    if self.failure is None:
                        failure = EvaluationError(f"{self.where}: cannot read {name}: {error}")
                        failure.__cause__ = error
                        self.failure = failure
                raise

        return _Lazy(run)

    def dense(self, name: str, entry: CatalogEntry) -> _Lazy:
        return self._guarded(name, lambda: self.reader.read(entry.file, entry.info))

    def dequantized(self, quantized: QuantizedModule) -> _Lazy:
        def load() -> torch.Tensor:
            stored = {s: self.reader.read(e.file, e.info) for s, e in quantized.stored.items()}
            # Eager kernels: the loader calls entries from several threads, and compiling there
            # would buy little for a one-off pass over each weight.
            return dequantize(stored, quantized.scheme, compile=False)

        return self._guarded(f"{quantized.module}.weight", load)


@contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """Keep transformers' multi-line loading report off the console: problems are raised here."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _model_class(config: Any, causal: bool, where: str) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    mapping: Any = MODEL_FOR_CAUSAL_LM_MAPPING if causal else MODEL_MAPPING
    try:
        return mapping[type(config)]
    except KeyError as error:
        kind = "causal LM" if causal else "model"
        name = type(config).__name__
        raise EvaluationError(f"{where}: transformers has no {kind} class for {name}") from error


def load_dequantized(path: Path, *, causal: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The dense model of the compressed-tensors checkpoint at `path`, on the CPU, in `dtype`."""
    from transformers import AutoConfig

    where = str(path)
    storage = open_storage(where)
    tensors, modules = _read_checkpoint(path, storage)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{where}: cannot read the model config: {error}") from error
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the architecture of the original, dense model
    model_class = _model_class(config, causal, where)
    stored_names = {f"{m.module}.{s}" for m in modules.values() for s in m.stored}
    with TensorReader(storage) as reader:
        entries = _Entries(reader, where)
        state: dict[str, Any] = {f"{m.module}.weight": entries.dequantized(m) for m in modules.values()}
        for name, entry in tensors.items():
            if name not in stored_names:
                state[name] = entries.dense(name, entry)
        try:
            with _transformers_errors_only():
                model, info = model_class.from_pretrained(
                    None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
                )
        except (OSError, ValueError, RuntimeError) as error:
            if entries.failure is not None:
                raise entries.failure from error
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise EvaluationError(f"{where}: cannot load the dequantized model: {first}") from error
    missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if missing:
        shown = ", ".join(str(k) for k in missing[:3])
        if len(missing) > 3:
            shown += f" and {len(missing) - 3} more"
        raise EvaluationError(f"{where}: the checkpoint lacks or mis-shapes {len(missing)} weight(s) of "
                              f"{model_class.__name__}: {shown}")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        _log.warning("%s: %d tensor(s) the model does not use, e.g. %s",
                     where, len(unexpected), unexpected[0])
    return model
