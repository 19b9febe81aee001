"""Recurring syncs: a Prefect deployment of the `sync` flow on a cron or interval schedule.

Two ways to run it, both needing a Prefect server (PREFECT_API_URL; Prefect's throw-away local
server runs no scheduler):
- `serve_sync`: registers the deployment and serves it from this process (long-running); the
  flow runs in subprocesses of this one.
- `deploy_sync`: registers the deployment on a work pool; `prefect worker start --pool NAME`
  processes on machines with quantfleet installed pick the runs up. The flow's code is taken
  from this checkout (`flow.from_source(<repository root>, "flows/sync.py:sync_flow")`), so the
  workers must see the same path (the same machine, a shared volume, or the same image layout).

Both give the deployment a concurrency limit of 1 with CANCEL_NEW: a trigger that comes while the
previous run of the same schedule is still going is cancelled rather than queued. A sync is
idempotent, so the next trigger picks up whatever the cancelled one would have done.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

__all__ = ["ENTRYPOINT", "REPO_ROOT", "sync_parameters", "sync_deployment", "serve_sync", "deploy_sync",
           "schedule_arguments"]

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/sync.py:sync_flow"


def sync_parameters(
    source: str,
    dest: str,
    recipes: list[str],
    *,
    max_parallel: int = 1,
    shard_size: int = 5_000_000_000,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """The deployment's parameters: what each scheduled run of `sync_flow` is called with."""
    params: dict[str, Any] = {"source": source, "dest": dest, "recipes": list(recipes),
                              "max_parallel": max_parallel, "shard_size": shard_size}
    if ray_address:
        params["ray_address"] = ray_address
    return params


def schedule_arguments(cron: str | None, interval: float | None) -> dict[str, Any]:
    """The deployment's schedule from a cron expression or an interval in seconds (exactly one);
    ValueError, in one line, for a bad one."""
    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of a cron expression and an interval")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)  # fail here, before anything is registered
        except ValueError as error:
            hint = '(expected 5 fields, e.g. "0 1 * * *")'
            raise ValueError(f"invalid cron expression {cron!r} {hint}") from error
        return {"cron": cron}
    assert interval is not None
    if interval <= 0:
        raise ValueError(f"the interval must be positive, got {interval:g} s")
    return {"interval": timedelta(seconds=interval)}


def _limit() -> Any:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def sync_deployment(
    name: str, parameters: dict[str, Any], *, cron: str | None = None, interval: float | None = None
) -> Any:
    """A RunnerDeployment of `sync_flow` with the schedule, parameters and concurrency limit."""
    from flows.sync import sync_flow

    return sync_flow.to_deployment(
        name=name, parameters=parameters, concurrency_limit=_limit(),
        description="quantfleet sync: convert and publish new checkpoints", tags=["quantfleet"],
        **schedule_arguments(cron, interval),
    )


def serve_sync(
    name: str, parameters: dict[str, Any], *, cron: str | None = None, interval: float | None = None
) -> None:
    """Register the deployment and serve it until interrupted."""
    from prefect import serve

    serve(sync_deployment(name, parameters, cron=cron, interval=interval))


def deploy_sync(
    name: str,
    parameters: dict[str, Any],
    pool: str,
    *,
    cron: str | None = None,
    interval: float | None = None,
    work_queue: str | None = None,
) -> UUID:
    """Register the deployment on work pool `pool`; returns its id. Workers run it."""
    from prefect import Flow

    flow: Any = Flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    deployment_id: UUID = flow.deploy(
        name=name, work_pool_name=pool, work_queue_name=work_queue, parameters=parameters,
        concurrency_limit=_limit(), build=False, push=False, print_next_steps=False,
        description="quantfleet sync: convert and publish new checkpoints", tags=["quantfleet"],
        **schedule_arguments(cron, interval),
    )
    return deployment_id
