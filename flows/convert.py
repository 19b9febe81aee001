"""The Prefect flow `convert`: plan -> convert -> finalize -> publish, with a summary artifact.

Runs with no Prefect server configured (Prefect starts a temporary local one) or against the
server PREFECT_API_URL names. The convert task is the Ray driver: it submits the units itself and
bounds what is in flight, rather than mapping thousands of Prefect tasks onto Ray.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.execute import start_ray
from flows.pipeline import (
    ConversionSummary,
    check_not_published,
    convert_units,
    finalize_and_publish,
    plan_conversion,
    summarize,
)
from flows.plan import Plan
from flows.progress import progress_hook
from flows.recipe import Recipe
from workers.records import UnitResult

__all__ = ["convert_flow"]


@task(name="plan", cache_policy=NO_CACHE, persist_result=False)
def plan_task(source: str, recipe: Recipe, shard_size: int) -> Plan:
    plan = plan_conversion(source, recipe, shard_size=shard_size)
    get_run_logger().info(
        "plan %s: %d tensors in %d units, %.1f MiB in -> %.1f MiB out",
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
    logger.info("%d units converted, %d already done by an earlier run", len(results) - reused, reused)
    return results


@task(name="finalize-and-publish", cache_policy=NO_CACHE, persist_result=False)
def publish_task(plan: Plan, dest: str, results: list[UnitResult]) -> str:
    uri = finalize_and_publish(plan, dest, results)
    get_run_logger().info("published %s", uri)
    return uri


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
    check_not_published(dest)
    plan = plan_task(source, recipe, shard_size)
    startup = time.perf_counter() - started
    results = convert_task(plan, dest, ray_address, device)
    published = publish_task(plan, dest, results)
    summary = summarize(plan, published, results, time.perf_counter() - started - startup, startup)
    create_markdown_artifact(
        key=f"conversion-{plan.plan_id}",
        markdown=summary.report + f"\nWall time: {summary.seconds:.1f} s\n",
        description=f"quantfleet conversion of {source} to {published}",
    )
    return summary
