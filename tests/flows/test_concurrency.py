"""How many units the driver keeps in flight, and what each asks of Ray, from the cluster's size."""

from __future__ import annotations

import pytest

from flows.execute import UNITS_PER_GPU_ENV, ClusterInfo, memory_request, unit_concurrency, unit_threads


def _cluster(cpus: float, gpus: float, memory: float = 0.0, nodes: int = 1) -> ClusterInfo:
    return ClusterInfo(address="local", nodes=nodes, cpus=cpus, gpus=gpus, memory=memory)


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


def test_cores_left_idle_by_few_units_go_to_the_units() -> None:
    assert unit_threads(_cluster(2, 0), 1) == 2  # one 1.5 GiB shard on a 2-core machine: both cores
    assert unit_threads(_cluster(16, 0), 3) == 5
    assert unit_threads(_cluster(16, 0), 40) == 1
    assert unit_threads(_cluster(64, 0, nodes=4), 1) == 16  # never more than one node's cores
    assert unit_threads(_cluster(16, 2), 1) == 1  # GPU units share the GPU, not the cores


def test_a_unit_never_asks_for_more_memory_than_the_largest_node_has() -> None:
    cluster = ClusterInfo(address="local", nodes=2, cpus=32, gpus=0, memory=48 * 2**30,
                          node_memory=32 * 2**30)
    assert memory_request(4 * 2**30, cluster) == 4 * 2**30
    assert memory_request(40 * 2**30, cluster) == 32 * 2**30  # else Ray would leave it pending forever
    assert memory_request(40 * 2**30, _cluster(16, 0)) == 40 * 2**30  # node memory unknown: as planned
