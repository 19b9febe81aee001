"""Finalize a conversion: the files that make the shards a loadable, documented checkpoint.

Everything is staged beside the shards (index, config.json with its quantization_config, side
files, the quantfleet.json manifest, report.md); `publish` then commits them in one step. The
manifest holds nothing run-specific (no times), so re-runs produce byte-identical artifacts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from flows.plan import Plan
from infra.publish import Expected, Publisher
from infra.safetensors import INDEX_NAME
from infra.storage import Storage
from quantizers import quantization_config
from workers.records import TensorRecord, UnitResult

__all__ = ["MANIFEST_NAME", "REPORT_NAME", "stage_metadata_files", "manifest", "report_markdown"]

MANIFEST_NAME = "quantfleet.json"
REPORT_NAME = "report.md"
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _dumps(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def side_file_keys(source: Storage) -> list[str]:
    """Every file of the source checkpoint that is not a weight file (tokenizer, configs, ...)."""
    keys = []
    for info in source.list(""):
        name = info.key.rsplit("/", 1)[-1]
        if info.key.startswith(".") or "/." in info.key or name == INDEX_NAME:
            continue
        if name.endswith(_SKIP_SUFFIXES):
            continue
        keys.append(info.key)
    return sorted(keys)


def config_with_quantization(source: Storage, plan: Plan) -> bytes | None:
    if not source.exists("config.json"):
        return None
    config = json.loads(source.read_bytes("config.json"))
    config["quantization_config"] = quantization_config(
        plan.quantized_modules(), ignore=plan.recipe.ignore_list()
    )
    return _dumps(config)


def manifest(plan: Plan, results: Sequence[UnitResult]) -> dict[str, object]:
    tensors = [r for result in results for r in result.tensors]
    return {
        "tool": "quantfleet",
        "tool_version": plan.tool_version,
        "plan_id": plan.plan_id,
        "source": {"uri": plan.source_uri, "identity": plan.source_identity},
        "recipe": plan.recipe.model_dump(mode="json"),
        "schemes": [s.model_dump(mode="json") for s in plan.schemes],
        "shards": [{"file": r.file_name, "size": r.size, "sha256": r.sha256} for r in results],
        "totals": {
            "bytes_in": sum(t.bytes_in for t in tensors),
            "bytes_out": sum(t.bytes_out for t in tensors),
            "tensors": len(tensors),
            "quantized": sum(1 for t in tensors if t.scheme is not None),
        },
        "tensors": [t.model_dump(mode="json") for t in sorted(tensors, key=lambda t: t.name)],
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def worst_tensors(tensors: Sequence[TensorRecord], count: int = 10) -> list[TensorRecord]:
    quantized = [t for t in tensors if t.sqnr_db is not None]
    return sorted(quantized, key=lambda t: (t.sqnr_db, t.name))[:count]


def report_markdown(plan: Plan, results: Sequence[UnitResult]) -> str:
    tensors = [r for result in results for r in result.tensors]
    bytes_in = sum(t.bytes_in for t in tensors)
    bytes_out = sum(t.bytes_out for t in tensors)
    quantized = [t for t in tensors if t.scheme is not None]
    q_in = sum(t.bytes_in for t in quantized)
    schemes = ", ".join(s.describe() for s in plan.schemes) or "nothing quantized"
    lines = [
        f"# quantfleet conversion {plan.plan_id}",
        "",
        f"Source: `{plan.source_uri}`  ",
        f"Recipe: {plan.recipe.label} ({schemes})",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| checkpoint size | {_size(bytes_in)} | {_size(bytes_out)} |",
        f"| quantized tensors | {_size(q_in)} | {_size(sum(t.bytes_out for t in quantized))} |",
        f"| compression ratio | | {bytes_in / max(bytes_out, 1):.2f}x |",
        f"| tensors quantized / kept | {len(quantized)} / {len(tensors) - len(quantized)} | |",
        f"| shards | | {len(results)} |",
        "",
    ]
    worst = worst_tensors(tensors)
    if worst:
        lines += [
            "## Worst tensors by SQNR",
            "",
            "| tensor | scheme | SQNR (dB) | rel. error | cosine |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{t.name}` | {t.scheme} | {t.sqnr_db:.2f} | {t.relative_error:.4f} | {t.cosine:.5f} |"
            for t in worst
        ]
        lines.append("")
    adjusted = [t for t in tensors if t.note]
    if adjusted:
        lines += ["## Shape adjustments", ""]
        lines += [f"- `{t.name}`: {t.note}" for t in adjusted]
        lines.append("")
    return "\n".join(lines)


def stage_metadata_files(
    publisher: Publisher, source: Storage, plan: Plan, results: Sequence[UnitResult]
) -> dict[str, object]:
    """Stage everything but the shards (already staged by the workers); returns the manifest."""
    for result in results:
        publisher.records[result.file_name] = Expected(size=result.size, sha256=result.sha256)
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
    data = manifest(plan, results)
    publisher.stage_bytes(MANIFEST_NAME, _dumps(data))
    publisher.stage_bytes(REPORT_NAME, report_markdown(plan, results).encode())
    return data
