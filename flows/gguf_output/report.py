"""The GGUF section of report.md and of the model card: which tensors got which type, and bits/weight.

For a mix (Q4_K_M, Q5_K_M) the bits per weight depend on the model (which layers get Q6_K), so
they are counted from the plan: every type's tensors, elements and bytes, and the whole file's.
"""

from __future__ import annotations

from collections.abc import Sequence

from flows.plan import Plan
from quantizers.gguf import GGUF_TYPES
from workers.records import TensorRecord

__all__ = ["gguf_lines", "gguf_bits_per_weight"]


def _by_type(plan: Plan) -> dict[str, tuple[int, int, int]]:
    """type -> (tensors, elements, bytes) of the GGUF file(s), merged experts counted once."""
    seen: dict[str, tuple[str, int, int]] = {}
    for job in plan.jobs():
        if job.gguf is not None:
            seen[job.gguf.name] = (job.gguf.type_name, job.gguf.elements, job.gguf.nbytes)
    table: dict[str, tuple[int, int, int]] = {}
    for kind, elements, nbytes in seen.values():
        count, total, size = table.get(kind, (0, 0, 0))
        table[kind] = (count + 1, total + elements, size + nbytes)
    return table


def gguf_bits_per_weight(plan: Plan) -> float | None:
    """Bits per weight of the whole GGUF model's tensor data (norms and all)."""
    table = _by_type(plan)
    elements = sum(e for _, e, _ in table.values())
    return 8 * sum(b for _, _, b in table.values()) / elements if elements else None


def gguf_lines(plan: Plan, tensors: Sequence[TensorRecord], folder: str = "") -> list[str]:
    """Markdown lines for a GGUF plan ([] for compressed-tensors output); `folder`: where the splits
    are in the version (`gguf/` beside a compressed-tensors checkpoint)."""
    if plan.recipe.format != "gguf":
        return []
    table = _by_type(plan)
    bpw = gguf_bits_per_weight(plan)
    lines = [
        f"## GGUF {plan.recipe.scheme.upper()}",
        "",
        f"llama.cpp / Ollama format in {len(plan.units)} split(s) (`{folder}{plan.units[0].file_name}` "
        f"loads them all); {bpw:.2f} bits per weight over all tensor data." if bpw is not None else "",
        "",
        "| GGUF type | tensors | weights | bits/weight |",
        "|---|---|---|---|",
    ]
    for kind, (count, elements, _) in sorted(table.items()):
        lines.append(f"| {kind} | {count} | {elements:,} | {GGUF_TYPES[kind].bits_per_weight:.2f} |")
    checked = [t for t in tensors if t.sqnr_db is not None]
    if checked:
        lines += ["", f"Every quantized tensor ({len(checked)}) was read back with the `gguf` package's "
                  "dequantizers and compared with its original (figures below)."]
    lines.append("")
    return lines
