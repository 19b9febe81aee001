"""How much a tensor's quantization error is expected to hurt the model: a prior from role and depth.

With no data, the planner multiplies each tensor's measured error (noise-to-signal of the weight,
||W - W'||^2 / ||W||^2, which is also the relative output noise on isotropic inputs) by a
sensitivity and minimises the sum. The sensitivity is the product of two factors, taken from what
practitioners' hand-made mixes do (llama.cpp's per-tensor rules for its _M/_L mixes, and the MoE
practice of keeping attention and shared experts wider than routed experts) rather than fitted:
fitting on the one small model we can evaluate would over-fit it. `benchmarks/mixed.py
--ablation` compares it with no prior (every factor 1) on SmolLM2; that run is still to be done
(docs/benchmarks.md, "Mixed precision on SmolLM2"), so the factors are a documented prior, not a
measured optimum.

- Role. Attention projections (q/k/v/o, and MLA's q_a/q_b/kv_a/kv_b) and shared experts: 2, since
  every token goes through them and an error in them moves every later token's attention;
  dense MLP weights: 1; v_proj and down_proj an extra x1.5 each (llama.cpp's Q4_K_M/Q5_K_M give
  attn_v and ffn_down more bits than the rest: their errors are not averaged away by a softmax or
  a gate); routed experts: 1 / 4 (a token visits a few of many experts, so each expert's error
  reaches a fraction of tokens; 1/4 rather than top-k/E because experts also differ in load).
- Depth. The first and the last eighth of the layers (at least one each): x2, as llama.cpp's
  `use_more_bits` does for attn_v/ffn_down; errors there reach every later layer (first) or the
  logits directly (last). Layers in between: x1.

Routers, norms, embeddings and lm_head are kept high: when a recipe targets them at all, they may
only take candidates of 8 bits or more (by default they are not quantized: see DEFAULT_IGNORE).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["ROLE_WEIGHTS", "EDGE_WEIGHT", "layer_index", "layer_count", "role_of", "sensitivity",
           "keeps_high"]

ROLE_WEIGHTS = {"attention": 2.0, "shared_expert": 2.0, "mlp": 1.0, "routed_expert": 0.25}
EXTRA = {"v_proj": 1.5, "down_proj": 1.5, "value": 1.5, "output.dense": 1.5}
EDGE_WEIGHT = 2.0

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")
_ATTENTION = re.compile(r"(self_attn|attention|attn)\.")
_SHARED = re.compile(r"shared_experts?\.")
_ROUTED = re.compile(r"experts\.\d+\.")
_KEEP_HIGH = re.compile(r"(?i)(^|\.)(lm_head|embed_tokens|embeddings?|wte|wpe|gate|router|[^.]*norm[^.]*)"
                        r"(\.weight)?$")


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_count(names: Iterable[str]) -> int:
    """Number of numbered layers the names span (largest index + 1; 0 when none is numbered)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def role_of(name: str) -> str:
    if _SHARED.search(name):
        return "shared_expert"
    if _ROUTED.search(name):
        return "routed_expert"
    if _ATTENTION.search(name):
        return "attention"
    return "mlp"


def keeps_high(name: str) -> bool:
    """Routers, norms, embeddings and lm_head: only 8-bit or wider candidates."""
    return _KEEP_HIGH.search(name) is not None


def sensitivity(name: str, layers: int) -> float:
    """The factor a tensor's measured error is multiplied by (see the module docstring)."""
    weight = ROLE_WEIGHTS[role_of(name)]
    module = name.removesuffix(".weight")
    weight *= next((factor for suffix, factor in EXTRA.items() if module.endswith(suffix)), 1.0)
    index = layer_index(name)
    if index is not None and layers > 0:
        edge = max(1, layers // 8)
        if index < edge or index >= layers - edge:
            weight *= EDGE_WEIGHT
    return weight
