"""What a mixed-precision plan records about its choice: small, frozen, part of the plan's JSON."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["TensorChoice", "UniformPoint", "MixedSummary"]


class TensorChoice(BaseModel):
    """One quantized tensor: the candidate chosen, its measured error, sensitivity and stored bits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    candidate: int  # index into MixedSummary.candidates
    error: float  # ||W - W'||^2 / ||W||^2 measured with that candidate
    sensitivity: float
    bits: int  # exact stored bits: codes, scales, zero points, shape, global scale
    elements: int


class UniformPoint(BaseModel):
    """One candidate used for every tensor, for comparison: its size and estimated damage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: str
    bits_per_weight: float
    damage: float


class MixedSummary(BaseModel):
    """The budget, what was spent, the estimated damage, and each tensor's choice."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    budget: str  # as the user gave it
    budget_bits: int  # for the quantized tensors
    bits_used: int
    damage: float  # sum of sensitivity x format weight x error over the quantized tensors
    candidates: tuple[str, ...]  # labels, e.g. "W4A16 int4 sym group 64 (rtn)"
    uniform: tuple[UniformPoint, ...]
    tensors: tuple[TensorChoice, ...]
    rows_sampled: int = 0  # tensors measured on a sample of their rows

    @property
    def elements(self) -> int:
        return sum(t.elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return self.bits_used / max(self.elements, 1)
