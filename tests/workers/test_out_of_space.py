"""A full disk behind a unit's failure, however deep in the chain, becomes one OutOfSpace line; a
write the destination refuses (read-only, permission) a DestinationUnwritable, and only when the
refused write is the destination's (another unit's source may be readable); credentials the
storage rejects, wherever, a CredentialsRefused. Each of these stops the run (FailsEveryUnit)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from infra.errors import AccessDenied, CredentialsRejected
from workers.errors import (
    CredentialsRefused,
    DestinationUnwritable,
    OutOfSpace,
    UnitFailed,
    out_of_space,
    shared_failure,
)


def _wrapped(cause: Exception) -> UnitFailed:
    # As the shard writer reports it: its thread's error, re-raised as the unit's failure.
    try:
        try:
            raise cause
        except Exception as error:
            raise UnitFailed(f"writing the shard failed: {error}") from error
    except UnitFailed as failed:
        return failed


@pytest.mark.parametrize(("code", "what"), [(errno.ENOSPC, "no space left on device"),
                                            (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_names_the_unit_the_folder_and_what_is_free(tmp_path: Path, code: int, what: str) -> None:
    found = out_of_space(_wrapped(OSError(code, "full")), "3 (model-00004-of-00009.safetensors)",
                         tmp_path / "model-00004-of-00009.safetensors")
    assert isinstance(found, OutOfSpace)
    assert str(found).startswith(f"unit 3 (model-00004-of-00009.safetensors): {what} writing in {tmp_path} (")
    assert str(found).endswith(" free there)")


def test_other_failures_are_left_as_they_are(tmp_path: Path) -> None:
    assert out_of_space(_wrapped(OSError(errno.EIO, "I/O error")), "0", tmp_path / "a") is None
    looped, other = ValueError("a"), ValueError("b")
    looped.__context__, other.__context__ = other, looped  # a chain that loops: no hang
    assert out_of_space(looped, "0", tmp_path / "a") is None


STAGING = "file:///data/out/.staging/0123abcd"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_a_refused_write_in_the_units_folders_stops_the_run(tmp_path: Path, code: int) -> None:
    scratch = tmp_path / "out" / ".staging" / "0123abcd" / ".qf-tmp-1-model.safetensors"
    refused = OSError(code, "refused", str(scratch))
    found = shared_failure(_wrapped(refused), "1 (model.safetensors)", STAGING, [scratch.parent])
    assert isinstance(found, DestinationUnwritable)
    assert str(found) == f"unit 1 (model.safetensors): refused writing in {scratch.parent}"


def test_a_source_that_cannot_be_read_is_left_to_its_unit(tmp_path: Path) -> None:
    source_file = tmp_path / "source" / "model-00002.safetensors"
    error = _wrapped(OSError(errno.EACCES, "Permission denied", str(source_file)))
    assert shared_failure(error, "1", STAGING, [tmp_path / "out"]) is None
    denied = AccessDenied("s3://models/source/model.safetensors: access denied (read): AccessDenied")
    assert shared_failure(denied, "1", "s3://models/out/.staging/0123abcd", []) is None
    # A staging prefix that merely starts the same is another prefix.
    other = AccessDenied("file:///data/out/.staging/0123abcdef/x: permission denied (put)")
    assert shared_failure(other, "1", STAGING, []) is None


def test_a_bucket_policy_refusing_staging_writes_stops_the_run() -> None:
    denied = AccessDenied(f"{STAGING}/units/00001.json: access denied (put): AccessDenied: Access Denied")
    found = shared_failure(denied, "1 (model.safetensors)", STAGING, [])
    assert isinstance(found, DestinationUnwritable)
    assert str(found) == f"unit 1 (model.safetensors): {denied}"


@pytest.mark.parametrize("uri", [f"{STAGING}/model.safetensors", "s3://models/source/model.safetensors"])
def test_rejected_credentials_stop_the_run_wherever_they_meet_them(uri: str) -> None:
    expired = CredentialsRejected(f"{uri}: access denied (read): ExpiredToken: The token has expired.")
    found = shared_failure(_wrapped(expired), "1 (model.safetensors)", STAGING, [])
    assert isinstance(found, CredentialsRefused)
    assert str(found) == f"unit 1 (model.safetensors): {expired}"
    assert (found.reason, found.remedy) == ("the storage refuses the credentials",
                                            "renew them (a session token expires after its set hours)")

