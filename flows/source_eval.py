"""What `quantfleet evaluate` needs to compare against a quantized source: its dense reading.

When the original checkpoint is itself quantized (block-FP8, gpt-oss MXFP4, compressed-tensors),
the evaluation must run the model the source means, dequantized exactly as the conversion's
workers dequantize it, so model-level figures and per-tensor figures share one reference. The
planner's reading of the source (`flows.sources`) names every dense tensor and its stored parts;
the evaluation (workers layer, maybe a Ray task on another machine) gets it as small records.
"""

from __future__ import annotations

from flows.plan import Plan
from flows.sources import read_source
from infra.safetensors import build_catalog, read_model_config
from infra.storage import open_storage
from workers.evaluation.source_model import SourceModel
from workers.units import TensorJob

__all__ = ["source_model", "plan_source_model"]


def source_model(uri: str) -> SourceModel | None:
    """The quantized source at `uri` as the evaluation loads it, or None for a dense checkpoint.

    Raises `SourceError` for a source quantfleet cannot read (one line naming the tensor).
    """
    storage = open_storage(uri)
    config = read_model_config(storage)
    if config is None or not config.get("quantization_config"):
        return None
    summary, tensors = read_source(config, build_catalog(storage))
    jobs = tuple(TensorJob(t.name, t.file, t.begin, t.end, t.dtype, t.shape, source=t.source, parts=t.parts)
                 for t in tensors)
    return SourceModel(summary.format, jobs)


def plan_source_model(plan: Plan) -> SourceModel | None:
    """The same, from a plan of that source (no second reading of its headers)."""
    if plan.source is None or not plan.source.quantized:
        return None
    jobs = tuple(TensorJob(j.name, j.file, j.begin, j.end, j.dtype, j.shape, source=j.source, parts=j.parts)
                 for j in plan.jobs())
    return SourceModel(plan.source.format, jobs)
