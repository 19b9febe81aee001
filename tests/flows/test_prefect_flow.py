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


def test_a_destination_that_turns_read_only_mid_flow_stops_it_and_the_rerun_resumes(
    prefect_server, tiny_llama, tmp_path
):
    # The default (Prefect) mode of tests/flows/test_destination.py's read-only case: the flow's
    # progress hook (what the CLI's bar listens to) remounts the disk read-only after one unit.
    import subprocess
    import time

    from flows.execute import ConversionFailed
    from flows.progress import reporting_progress
    from tests.flows.conftest import mounted_tmpfs

    recipe = Recipe.preset("W4A16")
    with mounted_tmpfs(tmp_path / "disk", "size=64m", "a filesystem to remount read-only needs one") as disk:
        dest = disk / "out"
        finished: list[int] = []

        def read_only_after_the_first(unit, result) -> None:  # noqa: ANN001
            finished.append(unit.index)
            # The driver sends no unit while this runs, so the units in flight close their files
            # and the remount (refused while a file is open for writing) goes through.
            deadline = time.monotonic() + 60
            while len(finished) == 1 and subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode:
                assert time.monotonic() < deadline, "the units in flight kept files open for a minute"
                time.sleep(0.05)

        with reporting_progress(read_only_after_the_first), pytest.raises(ConversionFailed) as failed:
            convert_flow(str(tiny_llama), str(dest), recipe, shard_size=100_000)
        units = len(finished) + len(failed.value.failures) + failed.value.not_started
        # Stopped: without the stop, every unit not finished failed (and none was left unstarted).
        assert units >= 12 and failed.value.not_started >= 1, str(failed.value)
        assert "more unit(s) not started: the destination cannot be written" in str(failed.value)
        assert all("Read-only file system writing in " in line for _, line in failed.value.failures)
        assert not (dest / DEFAULT_MARKER).exists()

        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        summary = convert_flow(str(tiny_llama), str(dest), recipe, shard_size=100_000)
        assert summary.units == units and summary.reused_units >= 1
        assert (dest / DEFAULT_MARKER).exists()
