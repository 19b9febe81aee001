"""A source file rewritten while it is being converted: nothing is published, the staged results
made from it are deleted, the error names the file, and a re-run converts the source as it is.

Against real local Ray, a real moto S3 server (an object uploaded again under its key) and the
CLI in the default Prefect mode.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.pipeline import convert_units, finalize_and_publish, plan_conversion
from flows.recipe import Recipe
from flows.source_check import SourceChanged
from infra.publish import is_published
from infra.storage import open_storage
from tests.flows.conftest import s3_storage, upload_dir
from tests.flows.test_cli import run_cli
from tests.s3_server import MotoS3

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

SHARD = 20_000_000
WEIGHTS = "model.safetensors"


def _rewrite_in_place(path: Path) -> None:
    """Another tool writes the file again, same bytes: only its modification time changes."""
    time.sleep(0.05)  # past the clock tick the file's last write was stamped with
    data = path.read_bytes()
    with open(path, "r+b") as handle:
        handle.write(data)


def test_a_local_source_rewritten_before_publishing_is_not_published(minilm: str, tmp_path: Path) -> None:
    source, dest = tmp_path / "source", tmp_path / "out"
    shutil.copytree(minilm, source)
    plan = plan_conversion(str(source), Recipe(scheme="W4A16"), shard_size=SHARD)
    results = convert_units(plan, str(dest))
    assert list(dest.glob(".staging/*/model-*.safetensors"))
    _rewrite_in_place(source / WEIGHTS)
    with pytest.raises(SourceChanged) as refused:
        finalize_and_publish(plan, str(dest), results)
    message = str(refused.value)
    changed = open_storage(str(source)).uri(WEIGHTS)
    assert message.startswith(f"{changed}: changed while it was being converted"), message
    assert "nothing was published" in message and "run the same command again" in message
    assert not is_published(open_storage(str(dest)), "")
    assert not [p for p in dest.rglob("*") if p.is_file()]  # the staged results went with it
    # Planned again, the source as it is now converts and publishes.
    again = plan_conversion(str(source), Recipe(scheme="W4A16"), shard_size=SHARD)
    assert again.plan_id != plan.plan_id
    finalize_and_publish(again, str(dest), convert_units(again, str(dest)))
    assert is_published(open_storage(str(dest)), "")


def test_an_s3_object_uploaded_again_is_found_changed(minilm: str, s3: MotoS3, tmp_path: Path) -> None:
    # Uploaded again with one byte changed (a fixed shard, say): a new ETag. (The same bytes
    # uploaded again would keep the ETag, and rightly count as unchanged.)
    uri, storage = s3_storage(s3, "changed-source")
    upload_dir(Path(minilm), storage)
    dest = tmp_path / "out"
    plan = plan_conversion(uri, Recipe(scheme="W4A16"), shard_size=SHARD)
    results = convert_units(plan, str(dest))
    weights = bytearray(storage.read_bytes(WEIGHTS))
    weights[-1] ^= 1  # the last byte of the last tensor's data
    storage.put_bytes(WEIGHTS, bytes(weights))
    with pytest.raises(SourceChanged, match=f"{storage.uri(WEIGHTS)}: changed while it was being converted"):
        finalize_and_publish(plan, str(dest), results)
    assert not is_published(open_storage(str(dest)), "")


def test_a_source_rewritten_during_a_cli_run_fails_in_one_line(
    cli_env: dict[str, str], minilm: str, tmp_path: Path
) -> None:
    # The default (Prefect) mode, as a user runs it: the file is rewritten once the first unit is
    # staged; publishing comes after every unit, the report and the chart, so it sees the change.
    source, dest = tmp_path / "source", tmp_path / "out"
    shutil.copytree(minilm, source)
    args = ("convert", str(source), str(dest), "--scheme", "W8A16", "--shard-size", "4MB")
    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **cli_env},
    )
    deadline = time.monotonic() + 300
    while not list(dest.glob(".staging/*/units/*.json")):
        assert run.poll() is None and time.monotonic() < deadline, "no unit was staged"
        time.sleep(0.02)
    _rewrite_in_place(source / WEIGHTS)
    _, err = run.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("converting ")]
    assert run.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("quantfleet: error: "), err
    assert f"{WEIGHTS}: changed while it was being converted" in lines[0], err
    assert "Traceback" not in err
    assert not (dest / "_QUANTFLEET_PUBLISHED.json").exists()
    # The same command again converts the source as it is now.
    again = run_cli(*args, env=cli_env)
    assert again.returncode == 0, again.stderr
    assert (dest / "_QUANTFLEET_PUBLISHED.json").exists()
