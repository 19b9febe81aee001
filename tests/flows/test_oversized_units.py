"""A unit whose memory estimate exceeds every node's still runs (alone on the largest node),
where Ray would leave a task asking for more than any node has pending forever."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.execute import start_ray
from flows.pipeline import convert_units, plan_conversion
from flows.recipe import Recipe


@pytest.mark.timeout(300)  # the failure this guards against is a hang
def test_a_unit_estimated_above_every_node_still_runs(
    local_ray: None, tiny_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = plan_conversion(str(tiny_llama), Recipe.preset("W4A16"), shard_size=1_000_000)
    cluster = start_ray()
    assert cluster.node_memory > 0
    # What a 4.2 GB embedding's estimate (4x, plus fixed costs) is on a 16 GB machine.
    huge = plan.units[0].model_copy(update={"memory_bytes": int(cluster.node_memory * 4)})
    oversized = plan.model_copy(update={"units": (huge, *plan.units[1:])})
    with caplog.at_level(logging.WARNING, logger="flows.execute"):
        results = convert_units(oversized, str(tmp_path / "out"), cluster=cluster, device="cpu")
    assert [r.index for r in results] == [u.index for u in plan.units]
    assert "1 unit(s) are estimated to need more memory than any node offers Ray's tasks" in caplog.text
    assert f"for {huge.file_name}): each runs alone on the largest node" in caplog.text
