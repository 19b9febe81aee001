"""`quantfleet verify` re-hashes a published version: a flipped byte and a deleted shard are caught."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.cli import main
from flows.sync import run_sync
from flows.versions import LATEST_NAME


@pytest.fixture(scope="module")
def published(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, local_ray: None) -> Path:
    bucket = tmp_path_factory.mktemp("bucket")
    summary = run_sync(str(tiny_llama), str(bucket), ["W8A16"], shard_size=1_000_000)
    assert [o.status for o in summary.outcomes] == ["converted"], summary.text()
    return bucket


def _copy(published: Path, tmp_path: Path) -> tuple[Path, Path]:
    bucket = tmp_path / "bucket"
    shutil.copytree(published, bucket)
    (recipe_dir,) = [p.parent for p in bucket.rglob(LATEST_NAME)]
    (version,) = [p for p in recipe_dir.iterdir() if p.is_dir()]
    return bucket, version


def test_clean_version_passes(published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bucket, version = _copy(published, tmp_path)
    assert main(["verify", str(version)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "PROBLEM" not in out
    assert main(["verify", "-q", str(version.parent)]) == 0  # via LATEST
    assert main(["verify", "-q", str(bucket)]) == 0  # every version under the prefix


def test_flipped_byte_fails(published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, version = _copy(published, tmp_path)
    shard = sorted(version.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", "-q", str(version)]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM: file://{shard}: SHA-256" in out and "FAILED (1 problem(s))" in out


def test_deleted_shard_fails(published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, version = _copy(published, tmp_path)
    shards = sorted(version.glob("*.safetensors"))
    assert len(shards) > 1, "the fixture publishes several shards"
    shards[0].unlink()
    assert main(["verify", "-q", str(version.parent)]) == 1
    assert f"PROBLEM: file://{shards[0]}: missing" in capsys.readouterr().out


def test_nothing_published_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quantfleet: error: ") and "no published version" in err[0]


def test_several_problems_found_in_parallel_are_listed_in_file_order(published: Path, tmp_path: Path) -> None:
    from flows.versions import published_bytes, verify_version
    from infra.storage import open_storage

    _, version = _copy(published, tmp_path)
    shards = sorted(version.glob("*.safetensors"))
    assert len(shards) >= 3, "the fixture publishes several shards"
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-1])
    last = bytearray(shards[-1].read_bytes())
    last[100] ^= 0x01
    shards[-1].write_bytes(bytes(last))
    storage = open_storage(version)
    hashed: list[int] = []
    report = verify_version(storage, "", parallel=4, on_bytes=hashed.append)
    assert [p.split(": ")[0].removeprefix("file://") for p in report.problems] == [
        str(shards[0]), str(shards[1]), str(shards[-1])]
    assert "missing" in report.problems[0] and "bytes, published with" in report.problems[1]
    assert sum(hashed) == report.bytes  # the progress adds up to what was re-hashed
    untouched = sum(s.stat().st_size for s in shards[2:])
    assert report.bytes < published_bytes(storage, "") and report.bytes >= untouched


def test_parallel_below_one_is_a_user_error(published: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--parallel", "0", str(published)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["quantfleet: error: --parallel must be at least 1, got 0"]
