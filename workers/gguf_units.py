"""What a work unit needs to know about one tensor of a GGUF split: its GGUF name, type and shape.

Planned by `flows.gguf_output.plan` from headers alone (so every split's header, and every tensor's
offset in it, is fixed before any weight is read) and carried by `TensorJob.gguf`. A merged MoE
tensor (`blk.N.ffn_down_exps.weight`, one 3-D tensor of all experts) is written by one job per
expert, each into its slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GGUFTarget"]


@dataclass(frozen=True, slots=True)
class GGUFTarget:
    """Where a source tensor goes in the GGUF file.

    `dims` are the whole GGUF tensor's, innermost first (a Hugging Face (out, in) weight is
    (in, out); merged experts add the expert count last); `expert` is this job's expert index in a
    merged tensor (None: the job is the whole tensor); `permute_heads` the head count llama.cpp's
    Llama RoPE layout permutes the rows with (None: not permuted).
    """

    name: str
    type_name: str
    dims: tuple[int, ...]
    nbytes: int  # the whole GGUF tensor's bytes
    expert: int | None = None
    permute_heads: int | None = None

    @property
    def slice_bytes(self) -> int:
        """Bytes this job writes: one expert's slice of a merged tensor, else the whole tensor."""
        if self.expert is None:
            return self.nbytes
        return self.nbytes // self.dims[-1]

    @property
    def elements(self) -> int:
        return math.prod(self.dims)
