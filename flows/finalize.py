"""Finalize a conversion: the files that make the shards a loadable, documented checkpoint.

Everything is staged beside the shards in two steps: first what makes the staged copy a loadable
checkpoint (index, config.json with its quantization_config, side files), so the optional
evaluation can run on it; then the quantfleet.json manifest, report.md and its per-layer error
chart, which include the evaluation and the gate results. `publish` then commits them in one step.
The model files (shards, index, config, side files) and the chart hold nothing run-specific, so
re-runs produce byte-identical checkpoints. The manifest's `units` (each unit's wall time, device
and node) and the report's "Where it ran" section record how the run went: a unit reused by a
resumed run keeps the figures of the run that made it, so a resume after a crash during commit
writes the same manifest again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from flows.charts import per_layer_chart
from flows.gates import GateResult, failed_gates
from flows.gguf_output.companion import GGUF_FOLDER, gguf_manifest, gguf_records
from flows.gguf_output.report import gguf_lines
from flows.plan import Plan
from flows.source_report import source_fields, source_lines
from flows.versions import MANIFEST_NAME
from infra.publish import DEFAULT_MARKER, Expected, Publisher
from infra.safetensors import INDEX_NAME, read_model_config
from infra.sizes import format_size
from infra.storage import Storage
from quantizers import quantization_config
from workers.evaluation import Evaluation
from workers.records import TensorRecord, UnitResult

__all__ = [
    "MANIFEST_NAME",
    "REPORT_NAME",
    "CHART_NAME",
    "stage_metadata_files",
    "stage_model_files",
    "stage_report_files",
    "manifest",
    "report_markdown",
    "bits_per_weight",
]

REPORT_NAME = "report.md"
CHART_NAME = "per_layer_error.png"
# Figures of an evaluation that depend on the run, not on the artifact: kept out of the manifest.
_RUN_SPECIFIC = {"seconds", "tokens_per_s", "quantized"}
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
_OWN_ARTIFACTS = frozenset({MANIFEST_NAME, REPORT_NAME, CHART_NAME, DEFAULT_MARKER, "mixed_precision.png"})


def _dumps(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def side_file_keys(source: Storage) -> list[str]:
    """Every file of the source checkpoint that is not a weight file (tokenizer, configs, ...)."""
    keys = []
    for info in source.list(""):
        name = info.key.rsplit("/", 1)[-1]
        if info.key.startswith(".") or "/." in info.key or name == INDEX_NAME:
            continue
        if name.endswith(_SKIP_SUFFIXES) or name in _OWN_ARTIFACTS:
            continue  # a quantfleet result as source: its manifest, report and marker are not ours
        keys.append(info.key)
    return sorted(keys)


def config_with_quantization(source: Storage, plan: Plan) -> bytes | None:
    config = read_model_config(source)
    if config is None:
        return None
    config["quantization_config"] = quantization_config(
        plan.quantized_modules(), ignore=plan.recipe.ignore_list()
    )
    return _dumps(config)


def bits_per_weight(plan: Plan, tensors: Sequence[TensorRecord]) -> dict[str, float | None]:
    """Stored bits per weight element: of the quantized tensors (scales included), and of all."""
    elements = {job.name: math.prod(job.shape) for job in plan.jobs()}
    quantized = [t for t in tensors if t.scheme is not None]
    q_elements = sum(elements.get(t.name, 0) for t in quantized)
    all_elements = sum(elements.get(t.name, 0) for t in tensors)
    return {
        "quantized": 8 * sum(t.bytes_out for t in quantized) / q_elements if q_elements else None,
        "all": 8 * sum(t.bytes_out for t in tensors) / all_elements if all_elements else None,
    }


def manifest(
    plan: Plan,
    results: Sequence[UnitResult],
    evaluation: Evaluation | None = None,
    gates: Sequence[GateResult] = (),
    gguf_results: Sequence[UnitResult] = (),
    gguf_evaluation: Evaluation | None = None,
) -> dict[str, object]:
    tensors = [r for result in results for r in result.tensors]
    extra: dict[str, object] = {}
    gguf = gguf_manifest(plan, gguf_results)
    if gguf is not None:
        if gguf_evaluation is not None:
            gguf["evaluation"] = gguf_evaluation.model_dump(mode="json", exclude=_RUN_SPECIFIC)
        extra["gguf"] = gguf
    if evaluation is not None:
        extra["evaluation"] = evaluation.model_dump(mode="json", exclude=_RUN_SPECIFIC)
    if gates:
        extra["gates"] = [g.model_dump(mode="json") for g in gates]
    return {
        **extra,
        "tool": "quantfleet",
        "tool_version": plan.tool_version,
        "plan_id": plan.plan_id,
        "staging_id": plan.staging_id,  # what the shards are made of (flows.reuse)
        "source": {"uri": plan.source_uri, "identity": plan.source_identity, **source_fields(plan)},
        "recipe": plan.recipe.model_dump(mode="json"),
        "schemes": [s.model_dump(mode="json") for s in plan.schemes],
        **({"mixed": plan.mixed.model_dump(mode="json")} if plan.mixed is not None else {}),
        "shards": [{"file": r.file_name, "size": r.size, "sha256": r.sha256} for r in results],
        "units": [_unit_entry(r) for r in sorted(results, key=lambda r: r.index)],
        "totals": {
            "bytes_in": sum(t.bytes_in for t in tensors),
            "bytes_out": sum(t.bytes_out for t in tensors),
            "tensors": len(tensors),
            "quantized": sum(1 for t in tensors if t.scheme is not None),
            "bits_per_weight": bits_per_weight(plan, tensors),
        },
        "tensors": [t.model_dump(mode="json") for t in sorted(tensors, key=lambda t: t.name)],
    }


def _unit_entry(result: UnitResult) -> dict[str, object]:
    return {
        "index": result.index,
        "file": result.file_name,
        "seconds": round(result.seconds, 3),
        "device": result.device,
        "node": result.node,
        "bytes_in": sum(t.bytes_in for t in result.tensors),
        "bytes_out": sum(t.bytes_out for t in result.tensors),
    }


def _placement_lines(results: Sequence[UnitResult]) -> list[str]:
    """Per node: units, bytes read, unit-seconds and throughput per busy worker."""
    nodes: dict[tuple[str, str], list[UnitResult]] = {}
    for result in results:
        nodes.setdefault((result.node, result.device), []).append(result)
    lines = [
        "## Where it ran",
        "",
        "| node | device | units | read | unit-seconds | MiB/s per busy worker |",
        "|---|---|---|---|---|---|",
    ]
    for (node, device), group in sorted(nodes.items()):
        read = sum(t.bytes_in for r in group for t in r.tensors)
        seconds = sum(r.seconds for r in group)
        rate = f"{read / 2**20 / seconds:.1f}" if seconds > 0 else "-"
        lines.append(f"| {node} | {device} | {len(group)} | {format_size(read)} | {seconds:.1f} | {rate} |")
    lines += ["", "Unit-seconds add up each unit's wall time on its worker; units on one node overlap.", ""]
    return lines


def worst_tensors(tensors: Sequence[TensorRecord], count: int = 10) -> list[TensorRecord]:
    quantized = [t for t in tensors if t.sqnr_db is not None]
    return sorted(quantized, key=lambda t: (t.sqnr_db, t.name))[:count]


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _metrics_lines(quantized: Sequence[TensorRecord]) -> list[str]:
    sqnrs = sorted(t.sqnr_db for t in quantized if t.sqnr_db is not None)
    cosines = [t.cosine for t in quantized if t.cosine is not None]
    errors = [t.output_error for t in quantized if t.output_error is not None]
    if not sqnrs:
        return []
    lines = [
        "## Per-tensor metrics",
        "",
        "| figure | median | worst |",
        "|---|---|---|",
        f"| SQNR (dB) | {sqnrs[len(sqnrs) // 2]:.2f} | {sqnrs[0]:.2f} |",
        f"| cosine | {sorted(cosines)[len(cosines) // 2]:.6f} | {min(cosines):.6f} |",
    ]
    if errors:
        ordered = sorted(errors)
        median, worst = ordered[len(ordered) // 2], ordered[-1]
        lines.append(f"| output error on random probes | {median:.4g} | {worst:.4g} |")
    lines.append("")
    return lines


def _evaluation_lines(evaluation: Evaluation) -> list[str]:
    from workers.evaluation.records import FIGURE_LABELS

    lines = [
        "## Model evaluation against the original",
        "",
        f"{evaluation.kind}; text: {evaluation.text} ({evaluation.tokens} tokens in {evaluation.windows} "
        f"windows of <= {evaluation.context}); {evaluation.device}, {evaluation.dtype}.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for name, value in evaluation.figures().items():
        shown = f"{value:.2%}" if name == "top1" else f"{value:.6g}"
        lines.append(f"| {FIGURE_LABELS[name]} | {shown} |")
    lines.append("")
    return lines


def _gate_lines(gates: Sequence[GateResult]) -> list[str]:
    if not gates:
        return []
    lines = ["## Gates", "", "| gate | scope | threshold | worst measured | result |",
             "|---|---|---|---|---|"]
    for g in gates:
        op = ">=" if g.gate.startswith("min_") else "<="
        lines.append(f"| `{g.gate}` | {g.scope} | {op} {g.threshold:g} | {_fmt(g.value, '.6g')} | "
                     f"{'pass' if g.passed else '**FAIL**'} |")
    lines.append("")
    failed = failed_gates(gates)
    if failed:
        lines += ["**Not published**: " + "; ".join(g.line() for g in failed) + ".", ""]
    return lines


def report_markdown(
    plan: Plan,
    results: Sequence[UnitResult],
    evaluation: Evaluation | None = None,
    gates: Sequence[GateResult] = (),
    chart: str | None = None,
    gguf_results: Sequence[UnitResult] = (),
    gguf_evaluation: Evaluation | None = None,
) -> str:
    tensors = [r for result in results for r in result.tensors]
    bytes_in = sum(t.bytes_in for t in tensors)
    bytes_out = sum(t.bytes_out for t in tensors)
    quantized = [t for t in tensors if t.scheme is not None]
    q_in = sum(t.bytes_in for t in quantized)
    bpw = bits_per_weight(plan, tensors)
    q_elements = sum(math.prod(j.shape) for j in plan.jobs() if j.scheme is not None)
    all_elements = sum(math.prod(j.shape) for j in plan.jobs())
    bpw_before_q = 8 * q_in / q_elements if q_elements else None
    bpw_before = 8 * bytes_in / all_elements if all_elements else None
    schemes = ", ".join(s.describe() for s in plan.schemes) or "nothing quantized"
    if plan.recipe.format == "gguf":
        schemes = f"GGUF {plan.recipe.scheme.upper()}"
    lines = [
        f"# quantfleet conversion {plan.plan_id}",
        "",
        f"Source: `{plan.source_uri}`  ",
        f"Recipe: {plan.recipe.label} ({schemes})",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| checkpoint size | {format_size(bytes_in)} | {format_size(bytes_out)} |",
        f"| quantized tensors | {format_size(q_in)} | {format_size(sum(t.bytes_out for t in quantized))} |",
        f"| bits per weight, quantized tensors | {_fmt(bpw_before_q, '.2f')} "
        f"| {_fmt(bpw['quantized'], '.2f')} |",
        f"| bits per weight, whole checkpoint | {_fmt(bpw_before, '.2f')} | {_fmt(bpw['all'], '.2f')} |",
        f"| compression ratio | | {bytes_in / max(bytes_out, 1):.2f}x |",
        f"| tensors quantized / kept | {len(quantized)} / {len(tensors) - len(quantized)} | |",
        f"| shards | | {len(results)} |",
        "",
    ]
    lines += source_lines(plan, tensors)
    lines += gguf_lines(plan, tensors)
    lines += _metrics_lines(quantized)
    if plan.gguf is not None:
        lines += _gguf_half_lines(plan.gguf, gguf_results)
        if gguf_evaluation is not None:
            section = _evaluation_lines(gguf_evaluation)
            section[0] = "### GGUF model evaluation against the original"
            lines += section
    if evaluation is not None:
        lines += _evaluation_lines(evaluation)
    lines += _gate_lines(gates)
    if plan.mixed is not None:
        from flows.mixed.report import CHART_NAME as MIXED_CHART
        from flows.mixed.report import report_lines

        lines += report_lines(plan.mixed, tensors, MIXED_CHART)
    if chart:
        lines += [
            "## Per-layer error",
            "",
            f"![per-layer error]({chart})",
            "",
            "Each quantized Linear's output error on fixed random probe vectors, ||Wx - W'x|| / ||Wx|| "
            "(the data-free check that also runs on models too big to evaluate). How well it predicts "
            "model-level KL divergence is measured by `quantfleet sweep` on a model that fits.",
            "",
        ]
    worst = worst_tensors(tensors)
    if worst:
        lines += [
            "## Worst tensors by SQNR",
            "",
            "| tensor | scheme | SQNR (dB) | rel. error | cosine | output error |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `{t.name}` | {t.scheme} | {t.sqnr_db:.2f} | {t.relative_error:.4f} | {t.cosine:.5f} "
            f"| {_fmt(t.output_error)} |"
            for t in worst
        ]
        lines.append("")
    adjusted = [t for t in tensors if t.note]
    if adjusted:
        lines += ["## Shape adjustments", ""]
        lines += [f"- `{t.name}`: {t.note}" for t in adjusted]
        lines.append("")
    if results or gguf_results:
        lines += _placement_lines([*results, *gguf_results])
    return "\n".join(lines)


def _gguf_half_lines(gguf: Plan, results: Sequence[UnitResult]) -> list[str]:
    """The report's section on the GGUF published beside the compressed-tensors checkpoint."""
    tensors = [t for r in results for t in r.tensors]
    size = sum(r.size for r in results)
    lines = gguf_lines(gguf, tensors, folder=f"{GGUF_FOLDER}/")
    lines[0] += f" (in `{GGUF_FOLDER}/`, {format_size(size)})"
    metrics = _metrics_lines([t for t in tensors if t.scheme is not None])
    if metrics:
        metrics[0] = "### GGUF per-tensor metrics"
    return lines + metrics


def stage_model_files(
    publisher: Publisher,
    source: Storage,
    plan: Plan,
    results: Sequence[UnitResult],
    gguf_results: Sequence[UnitResult] = (),
) -> None:
    """Record the staged shards (and GGUF splits) and stage what makes them a loadable checkpoint."""
    for result in results:
        publisher.records[result.file_name] = Expected(size=result.size, sha256=result.sha256)
    publisher.records.update(gguf_records(gguf_results))
    if plan.recipe.format == "gguf":
        return  # the splits are the whole model: metadata and tokenizer are in the first one
    for key in side_file_keys(source):
        if key == "config.json":
            continue
        publisher.stage_bytes(key, source.read_bytes(key))
    config = config_with_quantization(source, plan)
    if config is not None:
        publisher.stage_bytes("config.json", config)
    if len(results) > 1:
        weight_map = {name: r.file_name for r in results for name in r.weight_map}
        index = {"metadata": {"total_size": sum(r.size for r in results)},
                 "weight_map": dict(sorted(weight_map.items()))}
        publisher.stage_bytes(INDEX_NAME, _dumps(index))


def stage_report_files(
    publisher: Publisher,
    plan: Plan,
    results: Sequence[UnitResult],
    evaluation: Evaluation | None = None,
    gates: Sequence[GateResult] = (),
    gguf_results: Sequence[UnitResult] = (),
    gguf_evaluation: Evaluation | None = None,
) -> dict[str, object]:
    """Stage the manifest, the per-layer error chart and report.md; returns the manifest."""
    tensors = [r for result in results for r in result.tensors]
    # A mixed plan's recipe scheme is only its default: the charts name the budget instead.
    label = f"mixed precision, {plan.mixed.budget}" if plan.mixed is not None else plan.recipe.label
    png = per_layer_chart(tensors, f"{label}: per-layer error ({plan.plan_id})")
    if png is not None:
        publisher.stage_bytes(CHART_NAME, png)
    if plan.mixed is not None:
        from flows.mixed.report import CHART_NAME as MIXED_CHART
        from flows.mixed.report import bits_chart

        mixed_png = bits_chart(plan.mixed, tensors, f"{label}: bits and error per layer")
        if mixed_png is not None:
            publisher.stage_bytes(MIXED_CHART, mixed_png)
    data = manifest(plan, results, evaluation, gates, gguf_results, gguf_evaluation)
    publisher.stage_bytes(MANIFEST_NAME, _dumps(data))
    report = report_markdown(plan, results, evaluation, gates, CHART_NAME if png is not None else None,
                             gguf_results, gguf_evaluation)
    publisher.stage_bytes(REPORT_NAME, report.encode())
    return data


def stage_metadata_files(
    publisher: Publisher, source: Storage, plan: Plan, results: Sequence[UnitResult]
) -> dict[str, object]:
    """Stage everything but the shards (already staged by the workers); returns the manifest."""
    stage_model_files(publisher, source, plan, results)
    return stage_report_files(publisher, plan, results)
