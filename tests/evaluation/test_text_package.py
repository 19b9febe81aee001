"""The built-in evaluation text is package data: shipped in the wheel, found from an installed
copy (not only from this checkout), checked against its pinned SHA-256."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from workers.evaluation.text import DEFAULT_TEXT_FILE, DEFAULT_TEXT_SHA256, builtin_text

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "workers" / "evaluation" / "data"
_READ = ("from workers.evaluation.text import builtin_text, DEFAULT_TEXT_SHA256 as pinned; "
         "import workers; t = builtin_text(); print(workers.__file__, t.sha256 == pinned, len(t.text))")


def test_the_text_has_its_checksum_and_licence_beside_it() -> None:
    digest, name = (DATA / "python-reference.txt.sha256").read_text().split()
    assert (digest, name) == (DEFAULT_TEXT_SHA256, Path(DEFAULT_TEXT_FILE).name)
    assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == DEFAULT_TEXT_SHA256
    licence = (DATA / "python-reference.LICENSE.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence and "python-reference.txt" in licence
    assert builtin_text().sha256 == DEFAULT_TEXT_SHA256


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """quantfleet built into a wheel from a copy of the sources and installed into a folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("quantizers", "infra", "workers", "flows"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("quantfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for file in ("python-reference.txt", "python-reference.txt.sha256", "python-reference.LICENSE.txt"):
        assert f"workers/evaluation/data/{file}" in names, file
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


def _read_from(site: Path) -> subprocess.CompletedProcess[str]:
    # -I: isolated, so neither this checkout (cwd, PYTHONPATH) nor the editable install is seen.
    code = f"import sys; sys.path.insert(0, {str(site)!r}); {_READ}"
    return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)


def test_an_installed_wheel_ships_and_finds_the_text(installed) -> None:
    result = _read_from(installed)
    assert result.returncode == 0, result.stderr
    module, matches, length = result.stdout.split()
    assert Path(module).is_relative_to(installed) and matches == "True" and int(length) > 70_000


def test_a_changed_text_is_refused(installed, tmp_path) -> None:
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    data = site / "workers" / "evaluation" / DEFAULT_TEXT_FILE
    data.write_text(data.read_text().replace("Python", "Pyhton", 1))
    result = _read_from(site)
    assert result.returncode != 0
    assert "EvaluationError: the built-in evaluation text" in result.stderr and "reinstall" in result.stderr
