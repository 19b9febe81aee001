"""The CLI's own temporary Prefect server (flows/prefect_server.py), started for real.

- It answers, Prefect in this process runs a flow against it (no second server of Prefect's own),
  and `stop` ends the process and restores PREFECT_API_URL.
- A server that cannot start is one line (PrefectServerError), not a hang or a traceback.
"""

from __future__ import annotations

import os

import pytest

from flows.prefect_server import PrefectServerError, TemporaryServer, spawn_early


@pytest.fixture
def no_configured_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.mark.usefixtures("no_configured_server")
def test_a_flow_runs_against_it_and_stop_restores_the_settings() -> None:
    from prefect import flow
    from prefect.server.api.server import SubprocessASGIServer

    @flow
    def answer() -> int:
        return 42

    server = TemporaryServer.start_if_needed()
    assert server is not None
    try:
        url = server.use()
        assert os.environ["PREFECT_API_URL"] == url and server.used
        assert answer() == 42
        assert not SubprocessASGIServer().running  # Prefect did not start one of its own
        process = server.process
    finally:
        server.stop()
    assert process is not None and process.poll() is not None
    assert "PREFECT_API_URL" not in os.environ and not server.used


def test_a_configured_server_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert TemporaryServer.start_if_needed() is None


@pytest.mark.usefixtures("no_configured_server")
def test_a_server_that_cannot_start_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    database = tmp_path / "no" / "such" / "folder" / "prefect.db"
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{database}")
    server = TemporaryServer()
    try:
        with pytest.raises(PrefectServerError, match="exited with status 3: .*startup failed") as error:
            server.wait(timeout=120)
        assert "\n" not in str(error.value)
    finally:
        server.stop()


@pytest.mark.usefixtures("no_configured_server")
def test_an_early_server_is_the_one_the_conversion_uses() -> None:
    # `quantfleet convert` starts it before importing Prefect; the settings then confirm it.
    from prefect import flow

    @flow
    def answer() -> int:
        return 42

    early = spawn_early()
    assert early is not None and early.process is not None
    server = TemporaryServer.start_if_needed()
    try:
        assert server is early
        server.use()
        assert answer() == 42
    finally:
        server.stop()
    again = TemporaryServer.start_if_needed()
    try:
        assert again is not early  # handed out once
    finally:
        if again is not None:
            again.stop()  # a second server of its own: not left booting for the rest of the session
    assert early.process is None


@pytest.mark.usefixtures("no_configured_server")
def test_an_early_server_stops_when_the_settings_name_a_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    early = spawn_early()
    assert early is not None
    process = early.process
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert TemporaryServer.start_if_needed() is None
    assert process is not None and process.poll() is not None and early.process is None


def test_the_environment_can_rule_out_an_early_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert spawn_early() is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_ENABLED", "false")
    assert spawn_early() is None
