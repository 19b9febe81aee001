"""Gate results: each gate of the recipe, its threshold, the worst figure measured, pass or fail.

Tensor gates are enforced on the workers (a tensor below them fails its unit, so a finished
conversion has passed them); they are listed here with the worst figure for the report. Model
gates are checked here, on the evaluation of the staged result, before anything is published.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from flows.plan import Plan
from workers.evaluation import Evaluation
from workers.records import TensorRecord

__all__ = ["GateResult", "QualityGateFailed", "gate_results", "failed_gates", "describe_failures"]


class QualityGateFailed(Exception):
    """The staged result is below a model-level gate; it stays in staging and is not published."""

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.report = report  # the staged report.md, with the gate table


class GateResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gate: str
    scope: Literal["tensor", "model", "gguf model"]  # "gguf model": the GGUF half of a both-formats run
    threshold: float
    value: float | None  # the worst measured figure (None: not measured)
    passed: bool

    def line(self) -> str:
        op = ">=" if self.gate.startswith("min_") else "<="
        value = "not measured" if self.value is None else f"{self.value:.6g}"
        half = "GGUF " if self.scope == "gguf model" else ""
        return f"{half}{self.gate}: {value} (gate {op} {self.threshold:g})"


def _check(gate: str, scope: Literal["tensor", "model", "gguf model"], threshold: float,
           value: float | None) -> GateResult:
    if value is None:
        passed = scope == "tensor"  # nothing quantized: nothing to fail; a model figure must exist
    elif gate.startswith("min_"):
        passed = value >= threshold
    else:
        passed = value <= threshold
    return GateResult(gate=gate, scope=scope, threshold=threshold, value=value, passed=passed)


def gate_results(
    plan: Plan,
    tensors: Sequence[TensorRecord],
    evaluation: Evaluation | None,
    gguf_evaluation: Evaluation | None = None,
) -> list[GateResult]:
    gates = plan.recipe.gates
    quantized = [t for t in tensors if t.scheme is not None]
    results = []
    if plan.schemes:
        thresholds = {gates.min_sqnr_for(s) for s in plan.schemes}
        sqnrs = [t.sqnr_db for t in quantized if t.sqnr_db is not None]
        results.append(_check("min_sqnr_db", "tensor", min(thresholds), min(sqnrs, default=None)))
        cosines = [t.cosine for t in quantized if t.cosine is not None]
        results.append(_check("min_cosine", "tensor", gates.min_cosine, min(cosines, default=None)))
    if gates.max_output_error is not None:
        errors = [t.output_error for t in quantized if t.output_error is not None]
        worst = max(errors, default=None)
        results.append(_check("max_output_error", "tensor", gates.max_output_error, worst))
    model = {"max_mean_kl": "mean_kl", "min_top1": "top1", "min_embedding_cosine": "embedding_cosine"}
    for gate, figure in model.items():
        threshold = getattr(gates, gate)
        if threshold is not None:
            value = getattr(evaluation, figure) if evaluation is not None else None
            results.append(_check(gate, "model", threshold, value))
            if plan.gguf is not None:  # both formats: the GGUF half passes the same model gates
                value = getattr(gguf_evaluation, figure) if gguf_evaluation is not None else None
                results.append(_check(gate, "gguf model", threshold, value))
    return results


def failed_gates(results: Sequence[GateResult]) -> list[GateResult]:
    return [r for r in results if not r.passed]


def describe_failures(results: Sequence[GateResult], evaluation: Evaluation | None) -> str:
    failed = failed_gates(results)
    text = "; ".join(r.line() for r in failed)
    if evaluation is not None and any(r.value is None for r in failed):
        text += f" (a {evaluation.kind} has no such figure)"
    return text
