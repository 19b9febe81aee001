"""DeepSeek's multi-token-prediction (MTP) layers are carried through unchanged.

DeepSeek-V3/R1 and Kimi-K2 checkpoints hold `num_nextn_predict_layers` extra decoder layers after
the last one, `model.layers.{num_hidden_layers + i}.*` (a full decoder layer plus `eh_proj`,
`enorm`, `hnorm`, `shared_head`), which vLLM and SGLang use as the draft model of speculative
decoding. transformers drops them on load, so a pipeline that goes through transformers loses
them; quantfleet reads tensors, not modules, and copies them as the source holds them:

* dense tensors (norms, embeddings, the head, a bf16 source's Linears) byte for byte, outside
  every config group, so engines load them unquantized;
* block-FP8 weights byte for byte with their tile scales, renamed `weight`/`weight_scale` (the
  "carried over, exact" path), in an FP8 block config group that names their modules;
* other quantized source weights (compressed-tensors) dequantized to the model's dtype.

Not re-quantized: the draft layer was trained against the source's weights, and its accept rate
is what a conversion must not silently degrade.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flows.sources import SourceTensor
from quantizers import QuantScheme, get_scheme

__all__ = ["mtp_prefixes", "mtp_choice"]


def mtp_prefixes(config: dict[str, Any] | None) -> tuple[str, ...]:
    """Name prefixes of the source's MTP layers (none when the config declares none)."""
    config = config or {}
    layers, extra = config.get("num_hidden_layers"), config.get("num_nextn_predict_layers")
    if not isinstance(layers, int) or not isinstance(extra, int) or extra <= 0:
        return ()
    return tuple(f"model.layers.{layers + i}." for i in range(extra))


@lru_cache(maxsize=8)
def _exact_fp8(block: tuple[int, int]) -> QuantScheme:
    # One object per block size: the planner keys its per-shape decisions by scheme identity.
    return get_scheme("FP8_BLOCK").model_copy(update={"block_structure": block})


def mtp_choice(tensor: SourceTensor) -> tuple[QuantScheme, str] | None:
    """(scheme, method) that stores an MTP tensor exactly as the source does, or None to keep it dense."""
    source = tensor.source
    if source is None or source.kind != "block-fp8" or source.block is None:
        return None
    return _exact_fp8(source.block), "rtn"
