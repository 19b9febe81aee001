"""The Prefect flow against a real (temporary) Prefect server: steps, artifact, final state."""

from __future__ import annotations

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.convert import convert_flow
from flows.recipe import Recipe
from infra.publish import DEFAULT_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_convert_flow_runs_its_steps_and_records_an_artifact(prefect_server, minilm, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    dest = tmp_path / "out"
    state = convert_flow(minilm, str(dest), Recipe.preset("W8A16"), shard_size=50_000_000,
                         return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert (dest / DEFAULT_MARKER).exists()

    import asyncio

    async def read_back():
        async with get_client() as client:
            runs = await client.read_task_runs()
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"conversion-{summary.plan_id}"]))
            )
            return {r.name.rsplit("-", 1)[0] for r in runs}, artifacts

    task_names, artifacts = asyncio.run(read_back())
    assert {"plan", "convert", "finalize-and-publish"} <= task_names
    assert artifacts and "compression ratio" in artifacts[0].data
