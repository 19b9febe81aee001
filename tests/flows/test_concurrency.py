"""How many units the driver keeps in flight, and what each asks of Ray, from the cluster's size."""

from __future__ import annotations

import pytest

from flows.execute import UNITS_PER_GPU_ENV, ClusterInfo, unit_concurrency


def _cluster(cpus: float, gpus: float, memory: float = 0.0) -> ClusterInfo:
    return ClusterInfo(address="local", nodes=1, cpus=cpus, gpus=gpus, memory=memory)


def test_cpu_nodes_run_one_unit_per_core() -> None:
    assert unit_concurrency(_cluster(16, 0), 1 << 30) == (16, 0.0)


def test_units_share_each_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UNITS_PER_GPU_ENV, raising=False)
    assert unit_concurrency(_cluster(16, 2), 1 << 30) == (8, 0.25)
    monkeypatch.setenv(UNITS_PER_GPU_ENV, "8")
    assert unit_concurrency(_cluster(16, 1), 1 << 30) == (8, 0.125)


def test_memory_bounds_the_units_in_flight() -> None:
    assert unit_concurrency(_cluster(16, 0, memory=10 * 2**30), 4 * 2**30) == (2, 0.0)
    assert unit_concurrency(_cluster(16, 0, memory=2**30), 4 * 2**30) == (1, 0.0)  # never zero


def test_a_bad_setting_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(UNITS_PER_GPU_ENV, "lots")
    with pytest.raises(ValueError, match=f"{UNITS_PER_GPU_ENV}='lots': expected a positive whole number"):
        unit_concurrency(_cluster(16, 1), 1 << 30)
