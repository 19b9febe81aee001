"""Room at the destination: a conversion its filesystem cannot hold is refused before any work, in
one line, in both modes; a disk that fills during a run stops it at the unit that met it (the
units queued behind it are not started), and the re-run, once there is room, resumes and
publishes. A worker's full temp folder, where shards bound for S3 are assembled, is named with
how to move it.

The full disk mid-run is a real one: a small tmpfs, mounted for the test (which needs root and
is skipped, saying so, where mounting is not allowed).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.disk_space import HEADROOM_PER_TENSOR, InsufficientSpace, bytes_to_write, check_free_space
from flows.execute import ConversionFailed, run_units, start_ray
from flows.pipeline import (
    convert_units,
    finalize_and_publish,
    plan_conversion,
    unit_context,
)
from flows.recipe import Recipe
from infra.publish import is_published
from infra.storage import open_storage
from tests.flows.conftest import mounted_tmpfs
from tests.flows.test_destination import MODES, refused
from tests.s3_server import MotoS3
from workers.convert_unit import convert_unit, unit_record_key
from workers.errors import OutOfSpace

# A 405B-parameter model: its W4A16 conversion writes ~200 GiB, more than a CI machine's disk.
HUGE_SOURCE = "synthetic://llama-405b"
SHARD = 300_000  # bytes: the tiny Llama in 6 units


def _side_bytes(source: Path, plan) -> int:  # noqa: ANN001
    return sum((source / key).stat().st_size for key in plan.side_files)


@pytest.mark.parametrize("mode", MODES)
def test_a_destination_without_room_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mode: list[str]
) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free > 400 << 30:
        pytest.skip(f"this disk has {free >> 30} GiB free: room for the 405B model's W4A16")
    dest = tmp_path / "out"
    refused(capsys, ["convert", HUGE_SOURCE, str(dest), "--scheme", "W4A16", *mode],
            f"file://{dest}: this conversion writes ", " GiB there (", "but its filesystem has ",
            "choose another destination")
    assert not dest.exists()  # nothing written, not even the folder


def test_what_is_left_to_write_leaves_out_the_units_an_interrupted_run_finished(
    local_ray: None, tiny_llama: Path, tmp_path: Path
) -> None:
    recipe = Recipe.preset("W4A16")
    plan = plan_conversion(str(tiny_llama), recipe, shard_size=SHARD)
    assert len(plan.units) >= 3
    dest = open_storage(tmp_path / "dest")
    side = _side_bytes(tiny_llama, plan)
    assert bytes_to_write(plan, dest) == plan.bytes_out + side

    convert_units(plan, str(tmp_path / "dest"), cluster=start_ray(), device="cpu")
    staging = plan.publisher(dest).staging
    shards = {u.file_name: (tmp_path / "dest" / staging / u.file_name).stat().st_size for u in plan.units}
    # The plan counts the shards' tensor bytes; their headers fit in the margin for records.
    for unit in plan.units:
        header_room = HEADROOM_PER_TENSOR * len(unit.jobs)
        assert unit.bytes_out < shards[unit.file_name] <= unit.bytes_out + header_room
    assert bytes_to_write(plan, dest) == side

    # A unit whose record is missing (its run was killed before writing it) is converted again.
    again = plan.units[1]
    dest.delete(f"{staging}/{unit_record_key(again)}")
    assert bytes_to_write(plan, dest) == side + again.bytes_out


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs mounted at a fresh folder (unmounted after the test)."""
    with mounted_tmpfs(tmp_path / "small", "size=32m", "a full disk needs a small filesystem") as mount:
        yield mount


def test_a_disk_that_fills_during_the_run_stops_it_and_the_rerun_resumes(
    local_ray: None, tiny_llama: Path, small_disk: Path
) -> None:
    recipe = Recipe.preset("W4A16")
    plan = plan_conversion(str(tiny_llama), recipe, shard_size=SHARD)
    assert len(plan.units) >= 5  # more than the driver keeps in flight on 2 CPUs (4)
    dest_uri = str(small_disk / "out")
    dest = open_storage(dest_uri)
    context = unit_context(plan, dest, "cpu")
    cluster = start_ray()

    # Another process fills the disk after the check passed, to the last byte.
    check_free_space(plan, dest_uri)
    filler = small_disk / "filler"
    with filler.open("wb", buffering=0) as handle, pytest.raises(OSError, match="No space left"):
        while True:
            handle.write(b"\0" * 65536)
    assert shutil.disk_usage(small_disk).free < min(u.bytes_out for u in plan.units)

    with pytest.raises(ConversionFailed) as failed:
        run_units(plan.units, context, cluster=cluster)
    message = str(failed.value)
    first = plan.units[0]
    assert (f"unit 0 ({first.file_name}): no space left on device writing in "
            f"{small_disk}/out/.staging/{plan.staging_id} (") in message, message
    assert failed.value.not_started >= len(plan.units) - 4, message
    assert (f"{failed.value.not_started} more unit(s) not started: the disk is full. The units "
            "finished before stay staged: free some space and run the same command again to "
            "resume") in message, message
    staging = small_disk / "out" / ".staging" / plan.staging_id
    assert not [p.name for p in staging.rglob("*") if p.is_file() and not p.name.endswith(".json")
                and p.name not in {u.file_name for u in plan.units}]  # no scratch file left

    filler.unlink()
    check_free_space(plan, dest_uri)
    results = convert_units(plan, dest_uri, cluster=cluster, device="cpu")
    finalize_and_publish(plan, dest_uri, results, cluster=cluster, device="cpu")
    assert is_published(open_storage(dest_uri), "")
    assert not staging.exists()


def test_the_refusal_names_what_other_runs_left_staged_there(tiny_llama: Path, small_disk: Path) -> None:
    # An earlier run of another plan (a failed gate, another recipe) staged its result here: on a
    # large model that alone can leave too little room, and nothing said so.
    plan = plan_conversion(str(tiny_llama), Recipe.preset("W4A16"), shard_size=SHARD)
    dest = small_disk / "out"
    check_free_space(plan, str(dest))
    other = dest / ".staging" / "0123456789abcdef"
    other.mkdir(parents=True)
    (other / "model-00001-of-00002.safetensors").write_bytes(bytes(24 << 20))
    (dest / ".staging" / plan.staging_id).mkdir()  # this plan's own staging is not counted as another's
    (dest / ".staging" / plan.staging_id / "unit-0.json").write_bytes(b"{}")
    with pytest.raises(InsufficientSpace) as refused_:
        check_free_space(plan, str(dest))
    assert (f"(the staging of 1 other run(s) there holds 24.0 MiB: file://{other}; delete it if you "
            "will not resume that run) or choose another destination") in str(refused_.value)


def test_a_full_scratch_disk_of_an_s3_destination_says_how_to_move_it(
    tiny_llama: Path, small_disk: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_conversion(str(tiny_llama), Recipe.preset("W4A16"), shard_size=SHARD)
    dest = open_storage(f"s3://{s3.create_bucket()}/llama-w4a16")
    # The workers assemble each shard in their temp folder, here a full disk, then upload it.
    context = unit_context(plan, dest, "cpu")
    filler = small_disk / "filler"
    with filler.open("wb", buffering=0) as handle, pytest.raises(OSError, match="No space left"):
        while True:
            handle.write(b"\\0" * 65536)
    with pytest.raises(OutOfSpace) as failed:
        convert_unit(plan.units[0], context.model_copy(update={"scratch_dir": str(small_disk)}))
    assert f"writing in {small_disk} (" in str(failed.value)
    assert "point TMPDIR" not in str(failed.value)  # an explicit scratch folder: TMPDIR does not move it
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))  # as TMPDIR would, in this process
    with pytest.raises(OutOfSpace) as failed:
        convert_unit(plan.units[0], context)
    assert f"writing in {small_disk} (" in str(failed.value)
    assert ("shards bound for object storage are assembled there, one per running unit: point TMPDIR "
            "at a larger disk on the workers") in str(failed.value)
