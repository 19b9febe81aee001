"""What a mixed-precision budget is and which schemes compete for it.

`target_bits`: average stored bits per quantized weight element, scales, zero points and global
scales included. `target_size`: bytes of every tensor the output stores (quantized and kept
ones; the safetensors headers, config and tokenizer files are not counted). Either becomes a
number of bits for the quantized tensors, which the solver never exceeds.
"""

from __future__ import annotations

from infra.sizes import format_decimal_size

__all__ = ["DEFAULT_CANDIDATES", "ASYM_CANDIDATE", "default_candidates", "describe_budget"]

# (preset, group size) pairs tried per tensor when a recipe names no candidates. W4A16_ASYM g64
# (which the issue lists) is left out by default because transformers 5.x cannot load asymmetric
# pack-quantized weights (compressed-tensors 0.20 builds their zero points unpacked on the meta
# device; tests/quantizers/test_transformers_load.py tracks it with a strict xfail), and a mixed
# output must load there; name it in `candidates:` for vLLM-only use (ASYM_CANDIDATE).
# NVFP4A16 is searched (`quantizers.methods.search`) when the recipe leaves its method at rtn: at
# 5 bits per weight most weights stay at NVFP4's 4.5 bits, so its error sets most of the damage, and
# on SmolLM2-135M the search lowers uniform NVFP4A16's mean KL from 0.2213 to 0.1976 (2048 tokens;
# docs/benchmarks.md, "Mixed precision on SmolLM2"), for about 8x RTN's time on that one candidate
# in the measure pass (CPU, one 1536x576 weight). The stored format is the same. A recipe's own
# method (search, hqq) applies to every candidate instead; `candidates:` pins each one.
# W8A16 is stored per channel (one bf16 scale per row, about 8.03 bits on a 576-wide weight) rather
# than with the preset's g128 scales (8.25 bits): 8-bit errors are already far below 4-bit ones, so
# the 0.22 bits saved per 8-bit weight buy more tensors out of NVFP4 at the same budget. On
# SmolLM2-135M at 5 bits this moved the mix from 0.53x to 0.50x the best uniform 4-bit RTN's KL
# (docs/benchmarks.md). FP8 is per channel already.
ASYM_CANDIDATE: dict[str, object] = {"scheme": "W4A16_ASYM", "group_size": 64}
DEFAULT_CANDIDATES: tuple[dict[str, object], ...] = (
    {"scheme": "W4A16", "group_size": 128},
    {"scheme": "W4A16", "group_size": 64},
    {"scheme": "NVFP4A16", "method": "search"},
    {"scheme": "W8A16", "per_channel": True},
    {"scheme": "FP8"},
)


def default_candidates(method: str) -> tuple[dict[str, object], ...]:
    """The default candidates for a recipe whose method is `method`: rtn keeps each default's own."""
    if method == "rtn":
        return tuple({"method": "rtn", **c} for c in DEFAULT_CANDIDATES)
    return tuple({**c, "method": method} for c in DEFAULT_CANDIDATES)

def describe_budget(target_bits: float | None, target_size: int | None) -> str:
    if target_bits is not None:
        return f"{target_bits:g} bits per quantized weight"
    assert target_size is not None
    return f"{format_decimal_size(target_size)} in all ({target_size} bytes)"

