"""What plans, manifests and reports say about a quantized or re-laid-out source.

When the source is itself quantized, every per-tensor figure compares the result with the
dequantized source (what the source means), not with some original the tool never saw; the
manifest says so, and the report counts what was dequantized and what was carried over exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from flows.plan import Plan
from workers.records import TensorRecord
from workers.source_units import CARRIED_OVER

__all__ = ["source_fields", "source_lines", "plan_source_lines", "REFERENCE"]

REFERENCE = "dequantized quantized source"


def source_fields(plan: Plan) -> dict[str, object]:
    """Extra `source` entries of the manifest (none for a plain dense source)."""
    if plan.source is None:
        return {}
    fields: dict[str, object] = {"format": plan.source.format}
    if plan.source.quantized:
        fields["reference"] = REFERENCE
        fields["dense_dtype"] = plan.source.dense_dtype
    if plan.source.fused_experts_split:
        fields["fused_experts_split"] = plan.source.fused_experts_split
    if plan.source.activation_scales_dropped:
        fields["activation_scales_dropped"] = plan.source.activation_scales_dropped
    return fields


def plan_source_lines(plan: Plan) -> list[str]:
    """`quantfleet plan`'s lines: the source format, what is dequantized and what carried over."""
    if plan.source is None:
        return []
    jobs = [j for j in plan.jobs() if j.source is not None]
    carried = sum(1 for j in jobs if j.passthrough)
    requantized = sum(1 for j in jobs if j.scheme is not None and not j.passthrough)
    kept = sum(1 for j in jobs if j.scheme is None)
    lines = [f"source: {plan.source.format}"]
    if plan.source.quantized:
        formats = Counter(j.source.describe() for j in jobs if j.source is not None)
        lines.append(
            f"source weights: {len(jobs)} quantized ({', '.join(f'{n} {f}' for f, n in formats.items())}): "
            f"{requantized} dequantized and re-quantized, {kept} dequantized to {plan.source.dense_dtype}, "
            f"{carried} {CARRIED_OVER}; their scales are not copied"
        )
    if plan.source.activation_scales_dropped:
        lines.append(f"source activation and KV-cache scales: {plan.source.activation_scales_dropped} not "
                     "copied (the result quantizes weights only; activations stay 16-bit)")
    if plan.source.fused_experts_split:
        split = plan.source.fused_experts_split
        lines.append(f"fused experts: {split} 3-D tensors split into per-expert weights")
    fused = sum(1 for j in jobs if len(j.shape) == 3)
    if fused:
        lines.append(f"fused experts: {fused} fused expert tensors kept fused, dense "
                     f"{plan.source.dense_dtype} (transformers loads this architecture's experts only fused)")
    return lines


def source_lines(plan: Plan, tensors: Sequence[TensorRecord]) -> list[str]:
    """report.md's section on the source."""
    if plan.source is None:
        return []
    lines = ["## Source", "", f"The source is {plan.source.format}."]
    if plan.source.quantized:
        counts = Counter(t.source for t in tensors if t.source is not None)
        lines[-1] += (f" Its quantized weights were dequantized on the workers (float32, then "
                      f"{plan.source.dense_dtype}); the figures below compare against that {REFERENCE}.")
        lines += [""] + [f"- {n} tensors: {label}" for label, n in sorted(counts.items())]
    lines.append("")
    return lines
