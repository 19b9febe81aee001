"""How much a tensor's quantization error is expected to hurt the model: a prior from role and depth.

With no data, the planner multiplies each tensor's measured error (noise-to-signal of the weight,
||W - W'||^2 / ||W||^2, which is also the relative output noise on isotropic inputs) by a
sensitivity and by the candidate's format weight, and minimises the sum.

How the factors were chosen: measured on SmolLM2-135M (30 layers, the only causal LM we can
evaluate here), by quantizing one group of tensors at a time with NVFP4A16 (RTN) and measuring the
model's mean KL over 1024 tokens (`benchmarks/mixed_sensitivity.py`; figures in
docs/benchmarks.md, "Mixed precision on SmolLM2"): per projection, all 30 layers at once, then per
layer, all projections at once. A rank-1 fit KL ~ role x depth x error over those 37 measurements
gave the role factors below (rounded; measured, relative to a dense MLP's mean of gate and up:
q 0.65, k 0.57, v 1.48, o 0.53, gate 0.70, up 1.30, down 1.97). The same run put int4 g64 on
attention, gate/up and down: its KL was 1.4x, 1.2x and 2.0x what its relative error predicts with
those factors, hence FORMAT_WEIGHTS (1.5 for integer grids below 8 bits). The earlier prior
(attention 2x the MLP, v/down 1.5x, first and last eighth 2x, from llama.cpp's hand-made mixes)
over-rated q/k/o 3x to 4x against these measurements, so at 5 bits its solve put 63% of the weights
on int4 to pay for 8-bit attention. With the default candidates, this prior measures a mean KL of
0.1101 at 5 bits and no prior (every factor 1) 0.1189 (`benchmarks/mixed.py --ablation`).

- Role. Per projection: v 1.5, q and k 0.6, o 0.5, gate 0.7, up 1.3, down 2.0 (plausible reasons,
  not tested: q/k errors pass through the softmax, gate's through SiLU, which compress them; v, up
  and down errors pass linearly, and down's go straight into the residual stream). MLA's kv
  projections (k and v together): 1.0. Unknown projections: 1.0. Routed experts: the same times
  1/4 (a token visits a few of many experts, so each expert's error reaches a fraction of tokens;
  1/4 rather than top-k/E because experts also differ in load), so attention and shared experts
  get more bits than routed ones.
  Not measured: SmolLM2 has no experts.
- Depth. Measured per layer (mean 1), SmolLM2's factor runs 0.4 to 1.4 with one middle layer at
  2.2, the first layer at 1.1 and the last at 4.2 (its errors reach the logits with no later layer
  to dilute them). Only the edges carry to other models: the last layer x4 (LAST_LAYER_WEIGHT), the
  first x1.5 (FIRST_LAYER_WEIGHT: measured 1.1 here, kept at practitioners' value, llama.cpp's
  `use_more_bits`, since embeddings' outliers make first layers sensitive in larger models; at 5
  bits the choice between 1 and 1.5 moved the predicted KL by 2%). The middle is left at 1 rather
  than fitted: a per-layer profile of one 135M model would not transfer.

Routers, norms, embeddings and lm_head are kept high: when a recipe targets them at all, they may
only take candidates of 8 bits or more (by default they are not quantized: see DEFAULT_IGNORE).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from quantizers import QuantScheme

__all__ = ["PROJECTION_WEIGHTS", "ROUTED_EXPERT_WEIGHT", "FIRST_LAYER_WEIGHT", "LAST_LAYER_WEIGHT",
           "FORMAT_WEIGHTS", "layer_index", "layer_count", "role_of", "sensitivity", "format_weight",
           "keeps_high"]

# Module name suffix -> factor; the first suffix that matches wins (longer, more specific first).
PROJECTION_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("attention.output.dense", 0.5), ("kv_a_proj_with_mqa", 1.0), ("kv_b_proj", 1.0),
    ("q_a_proj", 0.6), ("q_b_proj", 0.6), ("q_proj", 0.6), ("query", 0.6),
    ("k_proj", 0.6), ("key", 0.6), ("v_proj", 1.5), ("value", 1.5), ("o_proj", 0.5), ("out_proj", 0.5),
    ("gate_proj", 0.7), ("w1", 0.7), ("up_proj", 1.3), ("w3", 1.3), ("intermediate.dense", 1.3),
    ("down_proj", 2.0), ("w2", 2.0), ("output.dense", 2.0),
)
ROUTED_EXPERT_WEIGHT = 0.25
FIRST_LAYER_WEIGHT = 1.5
LAST_LAYER_WEIGHT = 4.0
# Integer grids' errors cost more KL per unit of relative error than FP4/FP8's (measured 1.2x-2.0x
# for int4 g64 on SmolLM2, see the module docstring); applied to integer candidates below 8 bits.
FORMAT_WEIGHTS = {"int": 1.5, "float": 1.0}

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
    module = name.removesuffix(".weight")
    weight = next((factor for suffix, factor in PROJECTION_WEIGHTS
                   if module == suffix or module.endswith("." + suffix)), 1.0)
    if role_of(name) == "routed_expert":
        weight *= ROUTED_EXPERT_WEIGHT
    index = layer_index(name)
    if index is not None and layers > 1:
        weight *= FIRST_LAYER_WEIGHT if index == 0 else LAST_LAYER_WEIGHT if index == layers - 1 else 1.0
    return weight


def format_weight(scheme: QuantScheme) -> float:
    """The factor a candidate's measured error is multiplied by, for its number format."""
    return FORMAT_WEIGHTS["int"] if scheme.type == "int" and scheme.num_bits < 8 else 1.0
