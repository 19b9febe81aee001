#!/usr/bin/env bash
# The test command: lint, type-check, then the whole suite (real Ray, Prefect, a loopback S3).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
# PYTHONFAULTHANDLER: a crash prints every thread's stack, even after pytest's own handler is off.
export PYTHONFAULTHANDLER=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 RAY_agent_register_timeout_ms=120000 RAY_raylet_start_wait_time_s=120
.venv/bin/ruff check quantizers infra workers flows tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
