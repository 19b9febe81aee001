"""The conversion as four plain steps: plan -> convert -> finalize -> publish.

The Prefect flow (`flows.convert`) runs these same steps as its tasks; keeping them plain means
they can be tested and reused without an orchestrator.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from flows.charts import preload_pyplot
from flows.destination import check_destination
from flows.disk_space import check_free_space
from flows.eval_inputs import check_evaluation_inputs
from flows.execute import ClusterInfo, run_evaluation, run_units, start_ray, warm_workers
from flows.finalize import REPORT_NAME, stage_model_files, stage_report_files, worst_tensors
from flows.gates import GateResult, QualityGateFailed, describe_failures, failed_gates, gate_results
from flows.gguf_output.companion import gguf_half_context, gguf_staging_uri, with_gguf_plan
from flows.plan import Plan, build_plan, loads_with_model
from flows.published import already_holds
from flows.recipe import Recipe
from flows.source_check import check_source_unchanged, file_tags, with_source_files
from flows.sources import SourceError
from infra.publish import Expected, is_published
from infra.safetensors import INDEX_NAME, build_catalog, read_model_config
from infra.storage import Storage, open_storage
from workers.evaluation import Evaluation
from workers.records import TensorRecord, UnitContext, UnitResult
from workers.units import WorkUnit
from workers.warmup import kept_variants

__all__ = [
    "ConversionSummary",
    "SourceError",
    "plan_conversion",
    "unit_context",
    "warm_workers_for",
    "convert_units",
    "Publication",
    "QualityGateFailed",
    "stage_for_publish",
    "evaluate_staged",
    "evaluate_staged_gguf",
    "gate_and_publish",
    "finalize_and_publish",
    "run_conversion",
]

_log = logging.getLogger(__name__)


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
    evaluation: Evaluation | None = None
    gates: tuple[GateResult, ...] = ()
    gguf_bytes_out: int = 0  # the GGUF published beside a compressed-tensors checkpoint (`gguf:`)


class Publication(BaseModel):
    """What finalize-and-publish produced: where, the evaluation if any, the gates, the report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dest_uri: str
    evaluation: Evaluation | None
    gates: tuple[GateResult, ...]
    report: str


def plan_conversion(
    source_uri: str,
    recipe: Recipe,
    *,
    shard_size: int = 5_000_000_000,
    ray_address: str | None = None,
    device: str = "auto",
    cluster: Callable[[], ClusterInfo] | None = None,
) -> Plan:
    """Read the source's headers (no tensor data) and plan the conversion.

    A recipe with a budget (mixed precision) also runs the measure pass on Ray (`flows.mixed`), on
    the cluster `cluster()` gives (the CLI's background start), else on `start_ray(ray_address)`.
    """
    source = open_storage(source_uri)
    config = read_model_config(source)
    catalog = build_catalog(source)
    if config is None and recipe.format == "compressed-tensors":
        _log.warning("%s has no config.json: the result carries no quantization_config, which vLLM "
                     "and transformers need to load it (add the model's config.json to the source)",
                     source.uri())
    if catalog.unlisted_files:
        names = ", ".join(key.rsplit("/", 1)[-1] for key in catalog.unlisted_files)
        _log.warning("%s: %s not named in %s, so left out of the conversion", source.uri(), names, INDEX_NAME)
    if recipe.evaluates:
        why = "--evaluate" if recipe.evaluate.enabled else "the recipe's model-level gates"
        check_evaluation_inputs(source, catalog.side_files, recipe.evaluate.text, why=why)
    shard_tags = file_tags(source, catalog.files)
    # The plan id covers the side files the output carries that load with the model, too.
    tags = {**shard_tags, **file_tags(source, [k for k in catalog.side_files if loads_with_model(k)])}
    plan = build_plan(catalog, recipe, shard_size=shard_size, file_tags=tags, config=config)
    unmatched = recipe.unmatched(job.name for job in plan.jobs() if len(job.shape) == 2)
    if unmatched:
        _log.warning("%s: the recipe's %s match no 2-D weight of this checkpoint, so they select nothing "
                     "(`quantfleet plan --json` lists its tensors)", source.uri(), "; ".join(unmatched))
    # The GGUF half of a both-formats recipe is planned first: a refusal comes before any measuring.
    plan = with_gguf_plan(plan, catalog, shard_size=shard_size, file_tags=tags, config=config)
    if not recipe.mixed:
        return with_source_files(plan, shard_tags)
    from flows.mixed.planner import plan_mixed

    mixed = plan_mixed(
        plan, recipe, device=device, cluster=cluster or (lambda: start_ray(ray_address)),
        rebuild=lambda assign, key: build_plan(catalog, recipe, shard_size=shard_size, file_tags=tags,
                                               config=config, assign=assign, assign_key=key),
    )
    return with_source_files(mixed.model_copy(update={"gguf": plan.gguf}), shard_tags)


def unit_context(plan: Plan, dest: Storage, device: str) -> UnitContext:
    """What every unit of `plan` needs besides its jobs, staging at `dest`."""
    publisher = plan.publisher(dest)
    if plan.recipe.format == "gguf":
        from flows.gguf_output.plan import gguf_context

        return gguf_context(plan, dest.uri(publisher.staging), device)
    return UnitContext(
        plan_id=plan.plan_id,
        source_uri=plan.source_uri,
        staging_uri=dest.uri(publisher.staging),
        schemes=plan.schemes,
        methods=plan.methods,
        min_sqnr_db=tuple(plan.recipe.gates.min_sqnr_for(s) for s in plan.schemes),
        min_cosine=plan.recipe.gates.min_cosine,
        max_output_error=plan.recipe.gates.max_output_error,
        probes=plan.recipe.probes,
        device=device,
        compile_min_elements=plan.compile_floor(),
    )


def warm_workers_for(
    plan: Plan, cluster: ClusterInfo, device: str, variants: tuple[tuple[bool, ...], ...] | None = None
) -> list[Any]:
    """Warm `cluster`'s workers for `plan`: each scheme and its method with its largest tensor's
    size (elements), from which a worker knows which kernels the units will compile, and the
    variants of its codes kernel the units run (see `workers.warmup`; `variants` overrides them).
    Returns the warm-up tasks' refs (each gives its seconds), which nobody needs to wait on."""
    largest = [0] * len(plan.schemes)
    for job in plan.jobs():
        if job.scheme is not None and not job.passthrough:
            largest[job.scheme] = max(largest[job.scheme], math.prod(job.shape))
    memory = max((unit.memory_bytes for unit in plan.units), default=0)
    methods = tuple(plan.method_of(index) for index in range(len(plan.schemes)))
    if variants is None:
        variants = kept_variants(plan.jobs(), len(plan.schemes), plan.recipe.probes)
    return warm_workers(cluster, plan.schemes, largest, len(plan.units), memory, device, plan.compile_floor(),
                        methods, variants)


def check_not_published(dest_uri: str) -> Storage:
    # Not made here: a run refused before it writes anything leaves no empty folder behind.
    dest = open_storage(dest_uri)
    if is_published(dest, ""):
        raise already_holds(dest_uri)
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
    gguf_half: bool = False,
) -> list[UnitResult]:
    """Run the plan's units; with `gguf_half`, those of the GGUF of a both-formats recipe, staged in
    `gguf/` of the same version ([] when the recipe asks for one format)."""
    half = plan.gguf if gguf_half else plan
    if half is None:
        return []
    dest = check_not_published(dest_uri)
    if not gguf_half:  # both halves' bytes at once, before either writes
        check_free_space(plan, dest_uri)
    context = gguf_half_context(plan, dest, device) if gguf_half else unit_context(plan, dest, device)
    preload_pyplot()  # for the report's chart, drawn once the units are done
    return run_units(half.units, context, cluster=cluster or start_ray(ray_address),
                     max_in_flight=max_in_flight, on_done=on_done)


def stage_for_publish(
    plan: Plan, dest_uri: str, results: list[UnitResult], gguf_results: list[UnitResult] | None = None
) -> dict[str, Expected]:
    """Stage what makes the staged shards a loadable checkpoint; returns the staged files' records."""
    dest = check_not_published(dest_uri)
    publisher = plan.publisher(dest)
    stage_model_files(publisher, open_storage(plan.source_uri), plan, results, gguf_results or ())
    return dict(publisher.records)


def staged_uri(plan: Plan, dest_uri: str) -> str:
    dest = open_storage(dest_uri)
    return dest.uri(plan.publisher(dest).staging)


def evaluate_staged(
    plan: Plan, dest_uri: str, *, cluster: ClusterInfo | None = None, device: str = "auto"
) -> Evaluation | None:
    """Evaluate the staged copy against the source when the recipe asks for it (else None).

    Runs as a Ray task when a cluster is given (on a GPU when it has one), else in this process.
    """
    if not plan.recipe.evaluates:
        return None
    return _evaluate(plan, staged_uri(plan, dest_uri), cluster, device)


def evaluate_staged_gguf(
    plan: Plan, dest_uri: str, *, cluster: ClusterInfo | None = None, device: str = "auto"
) -> Evaluation | None:
    """The GGUF half of a both-formats run, evaluated as the compressed-tensors half is (else None)."""
    if plan.gguf is None or not plan.recipe.evaluates:
        return None
    return _evaluate(plan, gguf_staging_uri(plan, open_storage(dest_uri)), cluster, device)


def _evaluate(plan: Plan, staged: str, cluster: ClusterInfo | None, device: str) -> Evaluation:
    settings = plan.recipe.evaluate
    options: dict[str, object] = {
        "text": settings.text, "max_tokens": settings.max_tokens, "context": settings.context,
        "device": device,
    }
    from flows.source_eval import plan_source_model

    options["original_source"] = plan_source_model(plan)  # a quantized source: its dense meaning
    _log.info("evaluating the staged result %s against %s", staged, plan.source_uri)
    if cluster is not None:
        return run_evaluation(cluster, plan.source_uri, staged, **options)
    from workers.evaluation.evaluate import evaluate

    return evaluate(plan.source_uri, staged, **options)  # type: ignore[arg-type]


def gate_and_publish(
    plan: Plan,
    dest_uri: str,
    results: list[UnitResult],
    records: dict[str, Expected],
    evaluation: Evaluation | None = None,
    gguf_results: list[UnitResult] | None = None,
    gguf_evaluation: Evaluation | None = None,
) -> Publication:
    """Stage the manifest, report and chart, check the gates, and commit only if all pass.

    A failing result stays in staging with its report; QualityGateFailed says why.
    """
    dest = check_not_published(dest_uri)
    publisher = plan.publisher(dest)
    publisher.records.update(records)
    tensors = [t for r in results for t in r.tensors]
    gates = tuple(gate_results(plan, tensors, evaluation, gguf_evaluation))
    stage_report_files(publisher, plan, results, evaluation, gates, gguf_results or (), gguf_evaluation)
    report = publisher.storage.read_bytes(publisher.stage_key(REPORT_NAME)).decode()
    if failed_gates(gates):
        staged = dest.uri(publisher.staging)
        raise QualityGateFailed(
            f"{dest.uri()}: not published, below the recipe's gates: {describe_failures(gates, evaluation)}. "
            f"The result stays in staging ({staged}); its report: {staged}/{REPORT_NAME}",
            report=report,
        )
    check_source_unchanged(plan, dest, publisher.staging)  # last, just before the commit
    publisher.commit()
    return Publication(dest_uri=dest.uri(), evaluation=evaluation, gates=gates, report=report)


def finalize_and_publish(
    plan: Plan,
    dest_uri: str,
    results: list[UnitResult],
    *,
    cluster: ClusterInfo | None = None,
    device: str = "auto",
    gguf_results: list[UnitResult] | None = None,
) -> Publication:
    """Stage metadata files, evaluate if the recipe asks, check the gates, commit the version."""
    records = stage_for_publish(plan, dest_uri, results, gguf_results)
    evaluation = evaluate_staged(plan, dest_uri, cluster=cluster, device=device)
    gguf_evaluation = evaluate_staged_gguf(plan, dest_uri, cluster=cluster, device=device)
    return gate_and_publish(plan, dest_uri, results, records, evaluation, gguf_results, gguf_evaluation)


def summarize(
    plan: Plan,
    publication: Publication,
    results: list[UnitResult],
    seconds: float,
    startup: float,
    gguf_results: list[UnitResult] | None = None,
) -> ConversionSummary:
    tensors = [t for r in results for t in r.tensors]
    return ConversionSummary(
        dest_uri=publication.dest_uri,
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
        report=publication.report,
        evaluation=publication.evaluation,
        gates=publication.gates,
        gguf_bytes_out=sum(r.size for r in gguf_results or ()),
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
    check_destination(source_uri, dest_uri)
    check_not_published(dest_uri)
    plan = plan_conversion(source_uri, recipe, shard_size=shard_size, ray_address=ray_address, device=device)
    cluster = start_ray(ray_address)
    startup = time.perf_counter() - started
    results = convert_units(plan, dest_uri, cluster=cluster, device=device, on_done=on_done)
    gguf_results = convert_units(plan, dest_uri, cluster=cluster, device=device, on_done=on_done,
                                 gguf_half=True)
    publication = finalize_and_publish(plan, dest_uri, results, cluster=cluster, device=device,
                                       gguf_results=gguf_results)
    return summarize(plan, publication, results, time.perf_counter() - started - startup, startup,
                     gguf_results)
