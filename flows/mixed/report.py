"""How a mixed-precision choice is shown: `quantfleet plan` lines, report.md section, per-layer chart.

The chart has two panels over the layers: stored bits per weight of each layer's quantized tensors
(where the budget went, one bar segment per module kind) and the measured error of each tensor
after conversion (probe output error, else relative weight error), so a reader sees whether the
bits went where the error was.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from flows.charts import (
    _png,
    _pyplot,
    _serialised,
    chart_kind,
    chart_legend,
    integer_layers,
    layer_of,
    per_layer_series,
)
from flows.mixed.summary import MixedSummary
from workers.records import TensorRecord

__all__ = ["CHART_NAME", "plan_lines", "report_lines", "bits_chart", "layer_bits"]

CHART_NAME = "mixed_precision.png"


def _short(label: str) -> str:
    return label.split(" ", 1)[0] + " " + label.split(" ", 1)[1].replace("group ", "g")


def layer_bits(summary: MixedSummary) -> dict[int, dict[str, float]]:
    """Layer -> module kind (`chart_kind`) -> stored bits per weight of that tensor (of all the
    layer's routed experts together, for a folded kind)."""
    totals: dict[int, dict[str, tuple[int, int]]] = {}
    for t in summary.tensors:
        where = layer_of(t.name)
        if where is not None:
            kinds = totals.setdefault(where[0], {})
            bits, elements = kinds.get(chart_kind(where[1]), (0, 0))
            kinds[chart_kind(where[1])] = (bits + t.bits, elements + t.elements)
    return {layer: {kind: bits / max(elements, 1) for kind, (bits, elements) in kinds.items()}
            for layer, kinds in sorted(totals.items())}


def plan_lines(summary: MixedSummary, *, every_tensor: bool = True) -> list[str]:
    """The budget, what was spent, the uniform schemes for comparison, and each tensor's scheme."""
    lines = [
        f"mixed precision: budget {summary.budget} -> {summary.bits_per_weight:.4f} bits per quantized "
        f"weight ({summary.bits_used} of {summary.budget_bits} bits), estimated damage {summary.damage:.4g}",
    ]
    counts = Counter(summary.candidates[t.candidate] for t in summary.tensors)
    lines += [f"  {count:>5} tensors: {label}" for label, count in counts.most_common()]
    for point in sorted(summary.uniform, key=lambda p: p.bits_per_weight):
        lines.append(f"  uniform {_short(point.candidate)}: {point.bits_per_weight:.4f} bits, "
                     f"estimated damage {point.damage:.4g}")
    if summary.rows_sampled:
        lines.append(f"  {summary.rows_sampled} tensors were measured on a sample of their rows")
    if every_tensor:
        lines.append(f"{'tensor':<60} {'scheme':<40} {'bits/w':>7} {'error':>10} {'weight':>6}")
        for t in summary.tensors:
            lines.append(f"{t.name:<60} {_short(summary.candidates[t.candidate]):<40} "
                         f"{t.bits / max(t.elements, 1):>7.3f} {t.error:>10.3g} {t.sensitivity:>6.2f}")
    return lines


def report_lines(summary: MixedSummary, tensors: Sequence[TensorRecord], chart: str | None) -> list[str]:
    measured = {t.name: t for t in tensors}
    lines = ["## Mixed precision", ""]
    lines += [f"Budget: {summary.budget}; used {summary.bits_per_weight:.4f} bits per quantized weight "
              f"({summary.bits_used} of {summary.budget_bits} bits, scales included); estimated damage "
              f"(sum of sensitivity x format weight x measured error) {summary.damage:.4g}.", ""]
    lines += ["| scheme | tensors | share of quantized weights |", "|---|---|---|"]
    total = max(summary.elements, 1)
    for c, label in enumerate(summary.candidates):
        chosen = [t for t in summary.tensors if t.candidate == c]
        if chosen:
            lines.append(f"| {label} | {len(chosen)} | {sum(t.elements for t in chosen) / total:.1%} |")
    lines.append("")
    if summary.uniform:
        lines += ["Uniform schemes on the same tensors, for comparison:", "",
                  "| scheme | bits per weight | estimated damage |", "|---|---|---|"]
        lines += [f"| {p.candidate} | {p.bits_per_weight:.4f} | {p.damage:.4g} |"
                  for p in sorted(summary.uniform, key=lambda p: p.bits_per_weight)]
        lines.append("")
    per_layer: dict[int, list[float]] = {}
    for t in summary.tensors:
        where, record = layer_of(t.name), measured.get(t.name)
        if where is not None and record is not None and record.relative_error is not None:
            per_layer.setdefault(where[0], []).append(record.relative_error)
    if chart:
        lines += [f"![bits and error per layer]({chart})", ""]
    if per_layer:
        bits = layer_bits(summary)
        lines += ["| layer | bits per weight | mean relative error after conversion |", "|---|---|---|"]
        for layer, errors in sorted(per_layer.items()):
            values = list(bits.get(layer, {}).values())
            mean_bits = sum(values) / len(values) if values else 0.0
            lines.append(f"| {layer} | {mean_bits:.2f} | {sum(errors) / len(errors):.4g} |")
        lines.append("")
    return lines


@_serialised
def bits_chart(summary: MixedSummary, tensors: Sequence[TensorRecord], title: str) -> bytes | None:
    """Bits per weight per layer and module kind (top), measured error per layer (bottom)."""
    bits = layer_bits(summary)
    if not bits:
        return None
    measured = {t.name: t for t in tensors}
    kinds = sorted({kind for row in bits.values() for kind in row})
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    layers = list(bits)
    width = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        xs = [layer - 0.4 + width * (i + 0.5) for layer in layers]
        top.bar(xs, [bits[layer].get(kind, 0.0) for layer in layers], width=width, label=kind)
    top.set_ylabel("stored bits per weight")
    top.set_title(title, fontsize=10)
    top.grid(True, axis="y", alpha=0.3)
    top.legend(fontsize=7, ncol=min(len(kinds), 4), loc="upper center")
    series = per_layer_series([measured[t.name] for t in summary.tensors if t.name in measured])
    for i, kind in enumerate(kinds):
        points = series.get(kind, [])
        if points:
            bottom.plot([p[0] for p in points], [max(p[1], 1e-12) for p in points],
                        marker="os^vD<>ph*x+"[i % 12], linewidth=1, markersize=4, label=chart_legend(kind))
    bottom.set_yscale("log")
    integer_layers(bottom)
    bottom.set_xlabel("layer")
    bottom.set_ylabel("measured error")
    bottom.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    return _png(figure)
