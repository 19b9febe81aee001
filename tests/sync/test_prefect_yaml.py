"""The repository's prefect.yaml declares real, loadable deployments of the sync flow."""

from __future__ import annotations

import inspect
from datetime import timedelta
from pathlib import Path

import yaml

from flows.schedule import ENTRYPOINT, REPO_ROOT

PREFECT_YAML = REPO_ROOT / "prefect.yaml"


def test_prefect_yaml_declares_the_sync_deployments(monkeypatch) -> None:  # noqa: ANN001
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = config["deployments"]
    kinds = set()
    monkeypatch.chdir(REPO_ROOT)  # entrypoints are relative to the repository root
    for deployment in deployments:
        assert deployment["entrypoint"] == ENTRYPOINT
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert flow.name == "sync"
        params = inspect.signature(flow.fn).parameters
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        assert required <= set(deployment["parameters"]) <= set(params)
        assert isinstance(deployment["parameters"]["recipes"], list)
        limit = ConcurrencyLimitConfig(**deployment["concurrency_limit"])
        assert limit.limit == 1
        for schedule in deployment["schedules"]:
            if "cron" in schedule:
                CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
                kinds.add("cron")
            else:
                assert IntervalSchedule(interval=timedelta(seconds=schedule["interval"])).interval
                kinds.add("interval")
        assert deployment["work_pool"]["name"]
    assert kinds == {"cron", "interval"}
    assert (Path(REPO_ROOT) / ENTRYPOINT.split(":")[0]).is_file()
