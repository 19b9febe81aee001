"""A full disk behind a unit's failure, however deep in the chain, becomes one OutOfSpace line."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from workers.errors import OutOfSpace, UnitFailed, out_of_space


def _wrapped(cause: BaseException) -> UnitFailed:
    # As the shard writer reports it: its thread's OSError, re-raised as the unit's failure.
    try:
        try:
            raise cause
        except OSError as error:
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
