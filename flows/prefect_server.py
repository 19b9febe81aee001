"""A temporary Prefect API server for one `quantfleet convert`, started before anything else.

With no PREFECT_API_URL, Prefect starts a temporary server itself on the first flow call and waits
for it. That costs the CLI's main thread the import of Prefect's server modules (2-4 s of CPU on a
2-core machine, while Ray starts) and starts the server's boot late. Started here instead, as a
plain process as soon as the `quantfleet` command has parsed its arguments (`spawn_early`, before
torch or Prefect is imported), the server boots on another core while this process imports,
plans, starts Ray and warms the workers; the flow then runs against it as against a
dedicated server (`PREFECT_API_URL` set for the flow's duration). The process runs exactly what
Prefect's own temporary server runs (uvicorn on Prefect's app factory, UI off, the same settings)
and is stopped at exit, after Prefect's own exit handlers have sent their last logs and events
(as Prefect orders it for its own server), or at once if the run ends before its flow starts.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

__all__ = ["TemporaryServer", "PrefectServerError", "spawn_early"]

_STARTUP_FAILED = 3  # uvicorn's exit status when it cannot bind (or its app fails to start)
_RESPAWNS = 1  # another port, in case one was taken between choosing and binding it


class PrefectServerError(RuntimeError):
    """The temporary server did not answer; the message says why in one line."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporaryServer:
    """One Prefect API server process on a loopback port; `None` from `start_if_needed` when a
    server is configured (PREFECT_API_URL) or temporary servers are turned off."""

    def __init__(self, early: bool = False) -> None:
        self.port = _free_port()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # never a pipe: nobody drains it
        self._settings = contextlib.ExitStack()
        self._environment: str | None = None
        self._ui_environment: str | None = None
        self.process: subprocess.Popen[bytes] | None = self._spawn(early)
        atexit.register(self.stop)

    @classmethod
    def start_if_needed(cls) -> TemporaryServer | None:
        global _early
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        early, _early = _early, None
        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            if early is not None:
                early.stop()  # the settings (a profile, a .env file) name a server after all
            return None
        return early if early is not None else cls()

    @property
    def used(self) -> bool:
        """Whether this process's Prefect was pointed at the server (a flow may have run on it)."""
        return self._environment is not None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self, early: bool = False) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        if early:  # Prefect not imported yet: the server reads the same environment and files
            spec = importlib.util.find_spec("prefect")
            assert spec is not None and spec.origin is not None
            app_dir = Path(spec.origin).parent.parent
        else:
            import prefect
            from prefect.settings import get_current_settings

            env.update(get_current_settings().to_environment_variables(exclude_unset=True))
            app_dir = prefect.__module_path__.parent
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir),
                   "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=self._stderr)

    def wait(self, timeout: float | None = None) -> str:
        """Block until the server answers its health check; returns its API URL."""
        import httpx
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        limit = timeout or float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        deadline = time.monotonic() + limit
        respawns = 0
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.process is None:
                    raise PrefectServerError("the temporary Prefect server was stopped")
                status = self.process.poll()
                if status == _STARTUP_FAILED and respawns < _RESPAWNS:
                    respawns += 1
                    self.port = _free_port()
                    self.process = self._spawn()
                elif status is not None:
                    self._stderr.seek(0)
                    last = (self._stderr.read().decode(errors="replace").strip().splitlines()
                            or ["no output"])[-1]
                    raise PrefectServerError(
                        f"the temporary Prefect server exited with status {status}: {last}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                        return self.api_url
                time.sleep(0.1)
        raise PrefectServerError(f"the temporary Prefect server did not answer within {limit:g} s; set "
                                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher or "
                                 "PREFECT_API_URL to a running server")

    def use(self) -> str:
        """Wait for the server, then point this process's Prefect at it until `stop`.

        The current context's settings (the flow runs in it) and the environment (which settings
        made later, in Prefect's own threads, read) both name it, so no part of Prefect starts a
        server of its own.
        """
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        url = self.wait()
        if self._environment is None:
            self._environment = os.environ.get("PREFECT_API_URL", "")
            self._ui_environment = os.environ.get("PREFECT_UI_URL")
            os.environ["PREFECT_API_URL"] = url
            # This server serves no UI and is gone when the command ends: without a UI address,
            # Prefect logs no "View at http://127.0.0.1:<port>/runs/..." link that leads nowhere.
            os.environ["PREFECT_UI_URL"] = ""
            self._settings.enter_context(
                temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: ""}))
        return url

    def stop(self) -> None:
        """Stop the server (at once, or from the exit handler) and restore the settings."""
        process, self.process = self.process, None
        if self._environment is not None:
            if process is not None:
                _drain_prefect_workers()
            if self._environment:
                os.environ["PREFECT_API_URL"] = self._environment
            else:
                os.environ.pop("PREFECT_API_URL", None)
            if self._ui_environment is not None:
                os.environ["PREFECT_UI_URL"] = self._ui_environment
            else:
                os.environ.pop("PREFECT_UI_URL", None)
            self._environment = None
            with contextlib.suppress(Exception):  # at exit, from another context than entered
                self._settings.close()
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._stderr.close()


_early: TemporaryServer | None = None


def spawn_early() -> TemporaryServer | None:
    """Start the temporary server at once, before this process imports torch and Prefect; the
    server `start_if_needed` then returns. None where the environment names a server.

    `quantfleet convert` spent its first ~3 s importing torch, building the recipe and importing
    Prefect's settings on one core, and only then started the server, whose ~5 CPU-seconds of boot
    then competed with Ray's start. Decided from the environment alone (no PREFECT_API_URL,
    temporary servers not turned off); `start_if_needed` confirms it against Prefect's settings,
    which can also come from a profile or a .env file, and stops it where they name a server.
    """
    global _early
    ephemeral = os.environ.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "true").strip().lower()
    if _early is None and not os.environ.get("PREFECT_API_URL") and ephemeral not in ("0", "false", "no"):
        _early = TemporaryServer(early=True)
    return _early


def _drain_prefect_workers() -> None:
    """Send what Prefect's log and event workers still hold, while the server can take it.

    They drain in threading's interpreter-shutdown hooks, which `quantfleet` never reaches (it
    ends with os._exit after the exit handlers): a failed run's last logs (its task failures)
    were then sent while this server was stopping, and Prefect printed "--- Error logging to
    API ---" under the CLI's one-line error in most runs. Bounded: a stuck worker costs 5 s, not
    the exit.
    """
    workers = (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker"))
    for module, worker in workers:
        loaded = sys.modules.get(module)
        if loaded is not None:
            with contextlib.suppress(Exception):  # exiting anyway: nothing here may stop the exit
                getattr(loaded, worker).drain_all(timeout=5)
