"""Both formats from one recipe: the GGUF of the same conversion, published in the same version.

A compressed-tensors recipe with `gguf: Q4_K_M` plans a second conversion of the same source, to
GGUF (`flows.gguf_output.plan`), and keeps it on the plan (`Plan.gguf`). The same Ray workers write its
splits into `gguf/` of the same staging area once the compressed-tensors shards are done, each
split resuming on its own like any unit; one commit (one marker write) then publishes both, so a
version holds both formats or neither. The version's name is the compressed-tensors plan's id,
whose recipe includes the `gguf:` type: one version names the pair.

A published version:

    config.json, model-0000k-of-0000N.safetensors, ...   compressed-tensors: vLLM, transformers
    gguf/model-0000k-of-0000M.gguf (or gguf/model.gguf)   llama.cpp, Ollama, LM Studio
    quantfleet.json, report.md, README.md                 both: every file is in the manifest

Both halves are checked tensor by tensor on the workers, and, when the recipe evaluates, each is
evaluated against the original (the GGUF through `workers.evaluation.gguf_model`) and must pass
the recipe's model gates: a GGUF below them keeps the whole version in staging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flows.gguf_output.plan import build_gguf_plan, gguf_context
from flows.gguf_output.report import gguf_bits_per_weight
from flows.plan import Plan
from infra.publish import Expected
from infra.safetensors import Catalog
from infra.storage import Storage, join_key
from workers.records import UnitContext, UnitResult

__all__ = ["GGUF_FOLDER", "with_gguf_plan", "gguf_staging_uri", "gguf_half_context", "gguf_records",
           "gguf_manifest"]

GGUF_FOLDER = "gguf"


def with_gguf_plan(
    plan: Plan,
    catalog: Catalog,
    *,
    shard_size: int,
    file_tags: dict[str, tuple[int, str | None]] | None,
    config: dict[str, object] | None,
) -> Plan:
    """`plan` with its GGUF half when the recipe asks for one (an unsupported architecture or
    source is refused here, before anything runs)."""
    recipe = plan.recipe.gguf_recipe()
    if recipe is None:
        return plan
    gguf = build_gguf_plan(catalog, recipe, shard_size=shard_size, file_tags=file_tags, config=config)
    return plan.model_copy(update={"gguf": gguf})


def gguf_staging_uri(plan: Plan, dest: Storage) -> str:
    """Where the GGUF half is staged: `gguf/` of the version's staging area (the compressed-tensors
    plan's), where the one commit finds it and the evaluation reads it."""
    return dest.uri(join_key(plan.publisher(dest).staging, GGUF_FOLDER))


def gguf_half_context(plan: Plan, dest: Storage, device: str) -> UnitContext:
    """What the GGUF half's units need besides their jobs."""
    if plan.gguf is None:
        raise ValueError(f"plan {plan.plan_id} has no GGUF half")
    return gguf_context(plan.gguf, gguf_staging_uri(plan, dest), device)


def gguf_records(results: Sequence[UnitResult]) -> dict[str, Expected]:
    """What the commit checks and publishes of the GGUF half, keyed as in the version."""
    return {join_key(GGUF_FOLDER, r.file_name): Expected(size=r.size, sha256=r.sha256) for r in results}


def gguf_manifest(plan: Plan, results: Sequence[UnitResult]) -> dict[str, Any] | None:
    """The manifest's `gguf` entry: the GGUF plan, its splits and every tensor's figures."""
    if plan.gguf is None:
        return None
    tensors = sorted((t for r in results for t in r.tensors), key=lambda t: t.name)
    return {
        "plan_id": plan.gguf.plan_id,
        "type": plan.gguf.recipe.scheme,
        "splits": [{"file": join_key(GGUF_FOLDER, r.file_name), "size": r.size, "sha256": r.sha256}
                   for r in sorted(results, key=lambda r: r.index)],
        "bits_per_weight": gguf_bits_per_weight(plan.gguf),
        "tensors": [t.model_dump(mode="json") for t in tensors],
    }
