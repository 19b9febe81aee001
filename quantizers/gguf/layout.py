"""Row order llama.cpp expects for Llama-family Q/K projections.

llama.cpp's RoPE for LLM_ARCH_LLAMA rotates interleaved pairs (2i, 2i+1) while Hugging Face's
Llama rotates halves (i, i + head_dim/2); `convert_hf_to_gguf.py` therefore reorders the rows of
each head of q_proj and k_proj (k_proj with the KV head count). The same reshape is done here,
before quantizing, so the rows llama.cpp reads are the ones it expects.
"""

from __future__ import annotations

import torch

__all__ = ["llama_rope_permute"]


def llama_rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * head_dim, cols) -> same shape, each head's two halves interleaved row by row."""
    rows = weight.shape[0]
    # (heads, 2, head_dim / 2, cols) -> swap the half and position axes -> back to rows.
    halves = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)
