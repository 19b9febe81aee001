"""The GPU node kit (scripts/gpu_node/): its pins follow the project's, its wheel slimming keeps a
wheel installable, and its runner refuses an unknown step before doing anything.

Nothing here downloads: the wheel is built by the test, and the runner is only asked to refuse.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "scripts" / "gpu_node"


def _exact_pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;,\s]+)", requirement.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_the_node_gets_the_versions_the_project_pins() -> None:
    """A bump in pyproject.toml must reach the wheels carried to the node (what it runs there is
    what the tests here checked)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = _exact_pins(project)
    script = (KIT / "fetch_wheels.sh").read_text()
    ours = re.search(r"^download \.whl/ours (.*?[^\\])$", script, re.MULTILINE | re.DOTALL)
    assert ours is not None
    fetched = dict(re.findall(r"\b([a-z0-9-]+)==([0-9][^\s\\]*)", ours.group(1)))
    carried = {name: pinned[name] for name in ("ray", "compressed-tensors", "gguf") if name in pinned}
    assert len(carried) == 3, pinned
    for name, version in carried.items():
        assert fetched.get(name) == version, (name, fetched.get(name), version)


def test_slim_wheel_drops_folders_and_their_record_lines(tmp_path: Path) -> None:
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    info = "demo-1.0.dist-info"
    record = ("demo/__init__.py,,\ndemo/jars/big.jar,,\ndemo/ui/build/app.js,,\n"
              f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo/__init__.py", "VALUE = 1\n")
        archive.writestr("demo/jars/big.jar", b"\0" * 4096)
        archive.writestr("demo/ui/build/app.js", "x" * 4096)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", record)
    command = [sys.executable, str(KIT / "slim_wheel.py"), str(wheel), "demo/jars/", "demo/ui/"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "MB ->" in result.stdout
    with zipfile.ZipFile(wheel) as archive:
        assert sorted(archive.namelist()) == [f"{info}/METADATA", f"{info}/RECORD", f"{info}/WHEEL",
                                              "demo/__init__.py"]
        kept = archive.read(f"{info}/RECORD").decode()
    assert kept == f"demo/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n"
    # still a wheel pip installs, with the module that was kept
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    assert (target / "demo" / "__init__.py").read_text() == "VALUE = 1\n"
    assert not (target / "demo" / "jars").exists()


def test_run_checks_refuses_an_unknown_step_before_installing_anything(tmp_path: Path) -> None:
    env = {"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", str(KIT / "run_checks.sh"), "gpu_check", "benchmark-everything"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    log = (tmp_path / "checks.log").read_text()
    assert "unknown step: benchmark-everything" in log and "===" not in log
