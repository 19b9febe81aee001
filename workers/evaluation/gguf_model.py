"""Load a GGUF that quantfleet wrote as the dense transformers model it means, for `evaluate`.

A GGUF holds no config.json: the architecture comes from the original checkpoint it was converted
from, and each of the original's tensors is found in the GGUF under the name the conversion gave it
(`infra.gguf.model.map_tensor`, the same map, so the two cannot disagree). Each is dequantized by
the `gguf` package (llama.cpp's own reference dequantizers, ported), then put back in Hugging Face's
layout: an expert's slice of the layer's 3-D `ffn_*_exps` tensor, and Llama-family Q/K rows in
Hugging Face's RoPE order (the inverse of `quantizers.gguf.layout.llama_rope_permute`). Tensors
llama.cpp does not load (rotary inverse frequencies) are left to the model's own initialisation,
as llama.cpp recomputes them; a tied `lm_head` is tied as in the original. An original with fused
3-D experts (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) gets them back whole:
the gate and up `ffn_*_exps` tensors joined along their rows, the down one as it is.

The evaluation of a GGUF therefore measures the weights llama.cpp runs with; only llama.cpp's own
kernels (quantized dot products, its RoPE) differ from transformers' float computation.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.errors import InfraError
from infra.safetensors import build_catalog
from infra.storage import open_storage
from workers.evaluation.dequantized import _Lazy, _model_class, _transformers_errors_only
from workers.evaluation.errors import EvaluationError

__all__ = ["is_gguf", "gguf_files", "load_gguf_dequantized"]

# transformers 5's fused expert parameters, written to GGUF per expert under the per-expert names.
_FUSED = re.compile(r"(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def gguf_files(path: Path) -> list[Path]:
    """The GGUF file(s) of a folder (all splits, in order), or [path] for one .gguf file."""
    if path.is_file():
        return [path] if path.suffix == ".gguf" else []
    return sorted(path.glob("*.gguf"))


def is_gguf(path: Path) -> bool:
    """A .gguf file, or a folder of GGUF splits without a transformers config."""
    return bool(gguf_files(path)) and not (path.is_dir() and (path / "config.json").is_file())


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama_rope_permute: interleaved row pairs of each head back to halves."""
    rows = weight.shape[0]
    pairs = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(pairs.swapaxes(1, 2).reshape(weight.shape))


def load_gguf_dequantized(path: Path, original: Path, *, causal: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The model the GGUF at `path` (a file or a folder of splits) means, built from `original`'s
    config and tensor names, on the CPU, in `dtype`."""
    import gguf
    from transformers import AutoConfig

    from infra.gguf.model import family_for, map_tensor

    where = str(path)
    try:
        config_dict = json.loads((original / "config.json").read_text())
        family = family_for(config_dict, f"{original}/config.json")
        config = AutoConfig.from_pretrained(original)
        catalog = build_catalog(open_storage(str(original)))
        tensors: dict[str, Any] = {}
        for file in gguf_files(path):
            for tensor in gguf.GGUFReader(str(file)).tensors:
                tensors[tensor.name] = tensor
    except (OSError, ValueError, InfraError) as error:
        raise EvaluationError(f"{where}: cannot read the GGUF or its original's config: {error}") from error
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    def load(name: str, shape: tuple[int, ...], target: Any) -> torch.Tensor:
        if target.name not in tensors:
            raise EvaluationError(f"{where}: no GGUF tensor {target.name} (for {name})")
        tensor = tensors[target.name]
        dense = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if target.expert is not None:
            dense = dense[target.expert[0]]
        if target.permute_heads is not None:
            dense = _unpermute(dense, target.permute_heads)
        return torch.from_numpy(np.array(dense, dtype=np.float32, order="C").reshape(shape))  # writable

    def load_fused(name: str, shape: tuple[int, ...], targets: list[Any]) -> torch.Tensor:
        parts = []
        for target in targets:
            if target.name not in tensors:
                raise EvaluationError(f"{where}: no GGUF tensor {target.name} (for {name})")
            tensor = tensors[target.name]
            parts.append(gguf.quants.dequantize(tensor.data, tensor.tensor_type))  # (E, rows, columns)
        joined = np.concatenate(parts, axis=1)
        return torch.from_numpy(np.array(joined, dtype=np.float32, order="C").reshape(shape))

    state: dict[str, Any] = {}
    for name, entry in catalog.tensors.items():
        fused = _FUSED.fullmatch(name)
        if fused is not None and len(entry.info.shape) == 3:
            names = [f"{fused['prefix']}.0.{part}.weight" for part in _FUSED_PARTS[fused["kind"]]]
            targets = [map_tensor(expert, config_dict, family) for expert in names]
            if all(target is not None for target in targets):
                state[name] = _Lazy(functools.partial(load_fused, name, tuple(entry.info.shape), targets))
                continue
        target = map_tensor(name, config_dict, family)
        if target is not None:
            state[name] = _Lazy(functools.partial(load, name, tuple(entry.info.shape), target))
    model_class = _model_class(config, causal, where)
    try:
        with _transformers_errors_only():
            model, info = model_class.from_pretrained(
                None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvaluationError(f"{where}: cannot load the GGUF as {model_class.__name__}: {first}") from error
    wrong = sorted(info.get("mismatched_keys") or ())
    missing = [k for k in sorted(info.get("missing_keys") or ()) if "rotary_emb" not in str(k)
               and not (str(k).startswith("lm_head") and getattr(config, "tie_word_embeddings", False))]
    if wrong or missing:
        shown = ", ".join(str(k) for k in (wrong + missing)[:3])
        raise EvaluationError(f"{where}: the GGUF lacks or mis-shapes {len(wrong) + len(missing)} weight(s) "
                              f"of {model_class.__name__}: {shown}")
    return model
