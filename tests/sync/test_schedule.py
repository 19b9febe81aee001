"""Schedules against a real Prefect server (`prefect server start` on loopback, with its scheduler).

`quantfleet schedule --interval 5` serves the sync deployment in a subprocess; the test drops a
checkpoint into the loopback S3 bucket and watches: a run converts it and moves LATEST, a later
run converts nothing, a replaced weight file gives a new version and LATEST moves only to a
complete (published) version; no two runs of the schedule overlap. `--pool` registers the same
deployment on a process work pool (its pickup by a worker is not run here).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from flows.cli import main
from flows.versions import read_latest, verify_uri
from infra.publish import is_published
from infra.storage import open_storage
from tests.flows.conftest import save_tiny_model, upload_dir
from tests.s3_server import MotoS3

pytestmark = pytest.mark.slow
T = TypeVar("T")
_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, grace: float = 20) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_for(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        _wait_for("the Prefect server's /api/health", healthy, timeout=120)
        yield api
    finally:
        _stop(proc, signal.SIGTERM)
        log.close()


def _client(api: str) -> Any:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        from prefect.client.orchestration import get_client

        client: SyncPrefectClient = get_client(sync_client=True)
    return client


def _sync_headlines(api: str, deployment_name: str) -> list[tuple[str, str]]:
    """(flow run state, summary headline) of each finished run of the deployment, oldest first
    (none while `quantfleet schedule` has not registered it yet)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.exceptions import ObjectNotFound

    with _client(api) as client:
        try:
            deployment = client.read_deployment_by_name(f"sync/{deployment_name}")
        except ObjectNotFound:
            return []
        runs = client.read_flow_runs(limit=200)
        runs = [r for r in runs if r.deployment_id == deployment.id]
        only_sync = ArtifactFilter(key=ArtifactFilterKey(any_=["sync-summary"]))
        artifacts = client.read_artifacts(artifact_filter=only_sync)
    by_run = {a.flow_run_id: a.description or "" for a in artifacts}
    done = [r for r in runs if r.state is not None and r.state.is_final() and r.id in by_run]
    done.sort(key=lambda r: r.start_time or r.expected_start_time)
    return [(r.state.name, by_run[r.id]) for r in done if r.state is not None]


def _runs_overlap(api: str, deployment_name: str) -> list[str]:
    with _client(api) as client:
        deployment = client.read_deployment_by_name(f"sync/{deployment_name}")
        runs = [r for r in client.read_flow_runs(limit=200) if r.deployment_id == deployment.id]
    ran = [r for r in runs if r.start_time and r.state is not None and r.state.name != "Cancelled"]
    spans = sorted((r.start_time, r.end_time or r.start_time, f"{r.name} ({r.state.name})")
                   for r in ran if r.state)
    return [f"{a[2]} and {b[2]}" for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]


def test_interval_schedule_syncs_new_and_changed_checkpoints(
    prefect_api: str, s3: MotoS3, tiny_llama: Path, tmp_path: Path
) -> None:
    incoming, bucket = s3.create_bucket(), s3.create_bucket()
    source, dest = f"s3://{incoming}/", f"s3://{bucket}/"
    store = open_storage(dest)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "client-home"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    name = "every-5-s"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        serve = subprocess.Popen(
            [str(_BIN / "quantfleet"), "schedule", "--interval", "5", "--source", source, "--dest", dest,
             "--recipe", "W4A16", "--name", name, "--shard-size", "1MB"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        # A checkpoint dropped while the schedule is being served, landing as an upload does: two
        # of its three shards first, without the index. A run meanwhile finds it incomplete (and
        # succeeds), publishing nothing; the rest lands, and a later run converts the whole.
        landing = tmp_path / "landing"
        shutil.copytree(tiny_llama, landing, ignore=shutil.ignore_patterns("*00003-of-*", "*.index.json"))
        upload_dir(landing, open_storage(f"{source}llama"))

        def incomplete_run() -> bool:
            return any(state == "Completed" and "0 converted, 0 skipped, 0 failed, 1 incomplete" in headline
                       for state, headline in _sync_headlines(prefect_api, name))

        _wait_for("a run that finds the checkpoint incomplete", incomplete_run, timeout=150, every=1)
        assert read_latest(store, "llama", "W4A16") is None and not list(store.list(""))
        upload_dir(tiny_llama, open_storage(f"{source}llama"))

        def latest_complete() -> str | None:
            if serve.poll() is not None:
                raise AssertionError(f"the served schedule exited: {log_path.read_text()[-3000:]}")
            latest = read_latest(store, "llama", "W4A16")
            if latest is None:
                return None
            # LATEST only ever names a complete version: its marker exists whenever LATEST names it.
            assert is_published(store, f"llama/W4A16/{latest.version}"), latest
            return latest.version

        first = _wait_for("the first scheduled conversion", latest_complete, timeout=150)
        assert all(r.ok for r in verify_uri(f"{dest}llama/W4A16"))

        # A later run of the same schedule converts nothing.
        def quiet_run() -> bool:
            return any(state == "Completed" and "0 converted, 1 skipped, 0 failed" in headline
                       for state, headline in _sync_headlines(prefect_api, name))

        _wait_for("a scheduled run that converts nothing", quiet_run, timeout=90, every=1)
        assert read_latest(store, "llama", "W4A16").version == first  # type: ignore[union-attr]

        # Replace a weight file: the next run publishes a new version and only then moves LATEST.
        changed = save_tiny_model("llama", tmp_path / "changed", seed=7)
        src = open_storage(f"{source}llama")
        for path in sorted(changed.glob("*.safetensors"))[:1]:
            src.put_bytes(path.name, path.read_bytes())
        def moved() -> str | None:
            version = latest_complete()
            return version if version != first else None

        second = _wait_for("a new version after replacing a weight file", moved, timeout=150)
        assert second != first
        reports = verify_uri(dest)
        assert len(reports) == 2 and all(r.ok for r in reports)
        assert not _runs_overlap(prefect_api, name), "the concurrency limit keeps runs from overlapping"
        converted = [h for s, h in _sync_headlines(prefect_api, name) if "1 converted" in h]
        assert len(converted) == 2, converted
    finally:
        _stop(serve)


def test_schedule_with_pool_registers_a_deployment(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    with _client(prefect_api) as client:
        client.create_work_pool(WorkPoolCreate(name="quantfleet-test", type="process"))
    with temporary_settings({PREFECT_API_URL: prefect_api}):  # settings are read once per process
        code = main(["schedule", "--cron", "0 1 * * *", "--source", "s3://incoming/", "--dest",
                     "s3://models/", "--recipe", "W4A16", "--recipe", "FP8", "--name", "nightly",
                     "--pool", "quantfleet-test"])
    assert code == 0
    with _client(prefect_api) as client:
        deployment = client.read_deployment_by_name("sync/nightly")
    assert deployment.work_pool_name == "quantfleet-test"
    assert deployment.entrypoint == "flows/sync.py:sync_flow"
    assert deployment.parameters["recipes"] == ["W4A16", "FP8"]
    assert deployment.parameters["source"] == "s3://incoming/"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 1 * * *"]  # type: ignore[union-attr]
    assert deployment.global_concurrency_limit is not None
    assert deployment.global_concurrency_limit.limit == 1


@pytest.mark.parametrize(
    ("when", "message"),
    [(["--cron", "bogus"], "invalid cron expression 'bogus' (expected 5 fields, e.g. \"0 1 * * *\")"),
     (["--interval", "0"], "the interval must be positive, got 0 s")],
)
def test_a_bad_schedule_is_named_before_the_server_is_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, when: list[str],
    message: str,
) -> None:
    # Without a server the user was told to start one, and only then that the schedule was wrong.
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code = main(["schedule", *when, "--source", str(tmp_path / "drop"), "--dest", str(tmp_path / "out"),
                 "--recipe", "W4A16"])
    assert code == 2
    assert capsys.readouterr().err == f"quantfleet: error: {message}\n"
