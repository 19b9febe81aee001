"""The Prefect flow `convert`: plan -> convert -> stage -> [evaluate] -> finalize-and-publish.

The evaluate task runs when the recipe asks for it (`evaluate: true` or a model-level gate); a
result below a gate stays in staging, and the flow fails with the report as its artifact.

Runs with no Prefect server configured (Prefect starts a temporary local one) or against the
server PREFECT_API_URL names. The convert task is the Ray driver: it submits the units itself and
bounds what is in flight, rather than mapping thousands of Prefect tasks onto Ray.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.destination import check_destination
from flows.execute import start_ray
from flows.gates import QualityGateFailed
from flows.pipeline import (
    ConversionSummary,
    Publication,
    check_not_published,
    convert_units,
    evaluate_staged,
    evaluate_staged_gguf,
    gate_and_publish,
    plan_conversion,
    stage_for_publish,
    summarize,
)
from flows.plan import Plan
from flows.progress import progress_hook
from flows.recipe import Recipe
from infra.publish import Expected
from workers.evaluation import Evaluation
from workers.records import UnitResult

__all__ = ["convert_flow"]


@task(name="plan", cache_policy=NO_CACHE, persist_result=False)
def plan_task(source: str, recipe: Recipe, shard_size: int, ray_address: str | None = None,
              device: str = "auto") -> Plan:
    plan = plan_conversion(source, recipe, shard_size=shard_size, ray_address=ray_address, device=device)
    get_run_logger().info(
        "plan %s: %d tensors in %d unit(s), %.1f MiB in -> %.1f MiB out",
        plan.plan_id, sum(len(u.jobs) for u in plan.units), len(plan.units),
        plan.bytes_in / 2**20, plan.bytes_out / 2**20,
    )
    return plan


@task(name="convert", cache_policy=NO_CACHE, persist_result=False)
def convert_task(
    plan: Plan,
    dest: str,
    ray_address: str | None,
    device: str,
) -> list[UnitResult]:
    logger = get_run_logger()
    cluster = start_ray(ray_address)
    logger.info("Ray: %d node(s), %g CPUs, %g GPUs", cluster.nodes, cluster.cpus, cluster.gpus)
    results = convert_units(plan, dest, cluster=cluster, device=device, on_done=progress_hook())
    reused = sum(1 for r in results if r.reused)
    logger.info("%d unit(s) converted, %d already done by an earlier run", len(results) - reused, reused)
    return results


@task(name="convert-gguf", cache_policy=NO_CACHE, persist_result=False)
def convert_gguf_task(plan: Plan, dest: str, ray_address: str | None, device: str) -> list[UnitResult]:
    """The GGUF half of a both-formats recipe (recipe `gguf:`), into `gguf/` of the same version."""
    results = convert_units(plan, dest, cluster=start_ray(ray_address), device=device,
                            on_done=progress_hook(), gguf_half=True)
    reused = sum(1 for r in results if r.reused)
    get_run_logger().info("%d GGUF splits written, %d already done by an earlier run",
                          len(results) - reused, reused)
    return results


@task(name="stage", cache_policy=NO_CACHE, persist_result=False)
def stage_task(
    plan: Plan, dest: str, results: list[UnitResult], gguf_results: list[UnitResult]
) -> dict[str, Expected]:
    return stage_for_publish(plan, dest, results, gguf_results)


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(
    plan: Plan, dest: str, ray_address: str | None, device: str, gguf_half: bool = False
) -> Evaluation | None:
    """The staged result against the original; `gguf_half`: the GGUF of a both-formats recipe."""
    staged = evaluate_staged_gguf if gguf_half else evaluate_staged
    evaluation = staged(plan, dest, cluster=start_ray(ray_address), device=device)
    if evaluation is not None:
        what = "GGUF" if gguf_half else "result"
        get_run_logger().info("evaluation of the staged %s:\n%s", what, evaluation.table())
    return evaluation


@task(name="finalize-and-publish", cache_policy=NO_CACHE, persist_result=False)
def publish_task(
    plan: Plan,
    dest: str,
    results: list[UnitResult],
    records: dict[str, Expected],
    evaluation: Evaluation | None,
    gguf_results: list[UnitResult],
    gguf_evaluation: Evaluation | None,
) -> Publication:
    try:
        publication = gate_and_publish(plan, dest, results, records, evaluation, gguf_results,
                                       gguf_evaluation)
    except QualityGateFailed as error:
        create_markdown_artifact(
            key=f"conversion-{plan.plan_id}",
            markdown=error.report + f"\n{error}\n",
            description=f"quantfleet conversion of {plan.source_uri}: NOT published (gates)",
        )
        raise
    get_run_logger().info("published %s", publication.dest_uri)
    return publication


@flow(name="convert", log_prints=False)
def convert_flow(
    source: str,
    dest: str,
    recipe: Recipe,
    shard_size: int = 5_000_000_000,
    ray_address: str | None = None,
    device: str = "auto",
) -> ConversionSummary:
    """Convert the checkpoint at `source` with `recipe` and publish it at `dest`."""
    started = time.perf_counter()
    check_destination(source, dest)
    check_not_published(dest)
    plan = plan_task(source, recipe, shard_size, ray_address, device)
    startup = time.perf_counter() - started
    results = convert_task(plan, dest, ray_address, device)
    gguf_results = convert_gguf_task(plan, dest, ray_address, device) if plan.gguf is not None else []
    records = stage_task(plan, dest, results, gguf_results)
    evaluation = evaluate_task(plan, dest, ray_address, device) if recipe.evaluates else None
    gguf_evaluation = (evaluate_task(plan, dest, ray_address, device, gguf_half=True)
                       if recipe.evaluates and plan.gguf is not None else None)
    publication = publish_task(plan, dest, results, records, evaluation, gguf_results, gguf_evaluation)
    summary = summarize(plan, publication, results, time.perf_counter() - started - startup, startup,
                        gguf_results)
    chart = ""
    if "per_layer_error.png" in summary.report:
        chart = f"Per-layer error chart: {publication.dest_uri}/per_layer_error.png\n"
    create_markdown_artifact(
        key=f"conversion-{plan.plan_id}",
        markdown=summary.report + f"\n{chart}\nWall time: {summary.seconds:.1f} s\n",
        description=f"quantfleet conversion of {source} to {publication.dest_uri}",
    )
    return summary
