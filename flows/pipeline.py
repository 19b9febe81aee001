"""The conversion as four plain steps: plan -> convert -> finalize -> publish.

The Prefect flow (`flows.convert`) runs these same steps as its tasks; keeping them plain means
they can be tested and reused without an orchestrator.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from flows.execute import ClusterInfo, run_units, start_ray
from flows.finalize import report_markdown, stage_metadata_files, worst_tensors
from flows.plan import Plan, build_plan
from flows.recipe import Recipe
from infra.errors import AlreadyExists
from infra.publish import Publisher, is_published
from infra.safetensors import build_catalog
from infra.storage import Storage, open_storage
from workers.records import TensorRecord, UnitContext, UnitResult
from workers.units import WorkUnit

__all__ = [
    "ConversionSummary",
    "SourceError",
    "plan_conversion",
    "convert_units",
    "finalize_and_publish",
    "run_conversion",
]

_log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source this tool cannot convert (already quantized, no weights, ...)."""


class ConversionSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dest_uri: str
    plan_id: str
    units: int
    reused_units: int
    tensors: int
    quantized: int
    bytes_in: int
    bytes_out: int
    seconds: float
    startup_seconds: float
    worst: tuple[TensorRecord, ...]
    report: str


def plan_conversion(source_uri: str, recipe: Recipe, *, shard_size: int = 5_000_000_000) -> Plan:
    """Read the source's headers (no tensor data) and plan the conversion."""
    source = open_storage(source_uri)
    if source.exists("config.json"):
        existing = json.loads(source.read_bytes("config.json")).get("quantization_config")
        if existing:
            method = existing.get("quant_method", "unknown")
            raise SourceError(
                f"{source.uri('config.json')}: the source is already quantized "
                f"(quant_method {method!r}); quantfleet converts unquantized checkpoints"
            )
    catalog = build_catalog(source)
    tags = {}
    for key in catalog.files:
        info = source.stat(key)
        tags[key] = (info.size, info.etag or info.sha256)
    return build_plan(catalog, recipe, shard_size=shard_size, file_tags=tags)


def _context(plan: Plan, dest: Storage, device: str) -> UnitContext:
    publisher = Publisher(dest, "", plan.plan_id)
    return UnitContext(
        plan_id=plan.plan_id,
        source_uri=plan.source_uri,
        staging_uri=dest.uri(publisher.staging),
        schemes=plan.schemes,
        min_sqnr_db=tuple(plan.recipe.gates.min_sqnr_for(s) for s in plan.schemes),
        min_cosine=plan.recipe.gates.min_cosine,
        device=device,
    )


def check_not_published(dest_uri: str) -> Storage:
    dest = open_storage(dest_uri)
    if is_published(dest, ""):
        raise AlreadyExists(
            f"{dest.uri()}: already holds a published conversion; choose another destination "
            "(published versions are never overwritten)"
        )
    return dest


def convert_units(
    plan: Plan,
    dest_uri: str,
    *,
    cluster: ClusterInfo | None = None,
    ray_address: str | None = None,
    device: str = "auto",
    max_in_flight: int | None = None,
    on_done: Callable[[WorkUnit, UnitResult], None] | None = None,
) -> list[UnitResult]:
    dest = check_not_published(dest_uri)
    cluster = cluster or start_ray(ray_address)
    context = _context(plan, dest, device)
    return run_units(plan.units, context, cluster=cluster, max_in_flight=max_in_flight, on_done=on_done)


def finalize_and_publish(plan: Plan, dest_uri: str, results: list[UnitResult]) -> str:
    """Stage metadata files and commit the whole version; returns the published URI."""
    dest = check_not_published(dest_uri)
    publisher = Publisher(dest, "", plan.plan_id)
    stage_metadata_files(publisher, open_storage(plan.source_uri), plan, results)
    publisher.commit()
    return dest.uri()


def summarize(
    plan: Plan, dest_uri: str, results: list[UnitResult], seconds: float, startup: float
) -> ConversionSummary:
    tensors = [t for r in results for t in r.tensors]
    return ConversionSummary(
        dest_uri=dest_uri,
        plan_id=plan.plan_id,
        units=len(results),
        reused_units=sum(1 for r in results if r.reused),
        tensors=len(tensors),
        quantized=sum(1 for t in tensors if t.scheme is not None),
        bytes_in=sum(t.bytes_in for t in tensors),
        bytes_out=sum(t.bytes_out for t in tensors),
        seconds=seconds,
        startup_seconds=startup,
        worst=tuple(worst_tensors(tensors, 5)),
        report=report_markdown(plan, results),
    )


def run_conversion(
    source_uri: str,
    dest_uri: str,
    recipe: Recipe,
    *,
    shard_size: int = 5_000_000_000,
    ray_address: str | None = None,
    device: str = "auto",
    on_done: Callable[[WorkUnit, UnitResult], None] | None = None,
) -> ConversionSummary:
    """The whole conversion without an orchestrator (the Prefect flow runs the same steps)."""
    started = time.perf_counter()
    check_not_published(dest_uri)
    plan = plan_conversion(source_uri, recipe, shard_size=shard_size)
    cluster = start_ray(ray_address)
    startup = time.perf_counter() - started
    results = convert_units(plan, dest_uri, cluster=cluster, device=device, on_done=on_done)
    published = finalize_and_publish(plan, dest_uri, results)
    return summarize(plan, published, results, time.perf_counter() - started - startup, startup)
