"""Load a quantized SOURCE checkpoint (block-FP8, gpt-oss MXFP4, compressed-tensors) as the dense
model it means, dequantized by the same code the conversion verified every tensor against.

Why not transformers' own loaders: its block-FP8 path needs accelerate and a GPU kernel, its
MXFP4 path depends on the device, and neither is the dequantization the conversion's per-tensor
figures were measured against. Here every weight of the plan's source reading (`SourceModel.jobs`,
planned by `flows.sources`, names as the conversion writes them: per-expert weights of fused
experts, fused gpt-oss experts in transformers' layout) is read and dequantized lazily when
transformers' loader asks for it, rounded to the model's dtype as the workers do, so `evaluate`
compares the quantized model against exactly the reference the manifest names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infra.errors import InfraError
from infra.safetensors import TensorReader
from infra.storage import open_storage
from quantizers import QuantizationError
from workers.evaluation.dequantized import _Entries, _Lazy, _model_class, _transformers_errors_only
from workers.evaluation.errors import EvaluationError
from workers.source_read import read_dense
from workers.units import TensorJob

__all__ = ["SourceModel", "REFERENCE", "load_source_dequantized"]

REFERENCE = "dequantized quantized source"


@dataclass(frozen=True, slots=True)
class SourceModel:
    """A quantized source as the planner reads it: its format and one job per dense tensor."""

    format: str  # e.g. "block-FP8 128x128"
    jobs: tuple[TensorJob, ...]

    def reference(self) -> str:
        return f"{REFERENCE} ({self.format})"


def load_source_dequantized(
    path: Path, source: SourceModel, *, causal: bool, dtype: torch.dtype
) -> torch.nn.Module:
    """The dense model the quantized source at `path` means, on the CPU, in `dtype`."""
    from transformers import AutoConfig

    where = str(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{where}: cannot read the model config: {error}") from error
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the architecture of the dense model the source means
    model_class = _model_class(config, causal, where)
    cpu = torch.device("cpu")
    with TensorReader(open_storage(where)) as reader:
        entries = _Entries(reader, where)

        def lazy(job: TensorJob) -> _Lazy:
            return entries._guarded(job.name, lambda: read_dense(job, reader, cpu))

        state: dict[str, Any] = {job.name: lazy(job) for job in source.jobs}
        try:
            with _transformers_errors_only():
                model, info = model_class.from_pretrained(
                    None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
                )
        except (OSError, ValueError, RuntimeError, InfraError, QuantizationError) as error:
            if entries.failure is not None:
                raise entries.failure from error
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise EvaluationError(f"{where}: cannot load the dequantized source: {first}") from error
    missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if missing:
        shown = ", ".join(str(k) for k in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                                          else "")
        raise EvaluationError(f"{where}: the dequantized source lacks or mis-shapes {len(missing)} weight(s) "
                              f"of {model_class.__name__}: {shown}")
    return model

