"""Where compiled kernels are cached: the user's choice first, then ~/.cache, never a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.kernel_cache import use_kernel_cache

_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def test_the_users_cache_home_is_used_and_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    directory = use_kernel_cache()
    assert directory == tmp_path / "cache" / "quantfleet" / "inductor" and directory.is_dir()
    assert os.environ[_VARIABLE] == str(directory)


def test_a_cache_dir_set_by_the_user_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_VARIABLE, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert use_kernel_cache() == tmp_path / "mine"
    assert os.environ[_VARIABLE] == str(tmp_path / "mine") and not (tmp_path / "cache").exists()


def test_an_unusable_cache_home_leaves_inductors_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(_VARIABLE, raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert use_kernel_cache() is None
    assert _VARIABLE not in os.environ
