"""The README's "From Python" example, run as written (paths swapped for the bundled model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.pipeline import run_conversion
from flows.recipe import Recipe
from infra.errors import CatalogError

README = Path(__file__).resolve().parents[2] / "README.md"
SOURCE, DEST = "/models/Qwen3-8B", "s3://models/Qwen3-8B-W4A16"

pytestmark = pytest.mark.usefixtures("local_ray")


def readme_example() -> str:
    section = README.read_text().split("### From Python\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_converts_and_publishes(minilm, tmp_path) -> None:
    import ray

    code = readme_example()
    assert SOURCE in code and DEST in code, code
    dest = tmp_path / "out"
    code = code.replace(DEST, str(dest)).replace(SOURCE, minilm)  # DEST holds SOURCE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert result.returncode == 0, result.stderr
    uri, bytes_in, bytes_out = result.stdout.split()
    assert uri == f"file://{dest}" and int(bytes_out) < int(bytes_in)
    assert (dest / "_QUANTFLEET_PUBLISHED.json").exists()
    config = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert "lm_head" in config["ignore"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4


def test_what_the_command_refuses_raises_with_its_one_line(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(CatalogError) as refused:
        run_conversion(str(missing), str(tmp_path / "out"), Recipe.preset("W4A16"))
    assert str(refused.value) == f"file://{missing}: nothing there (no such folder, or an empty one)"
    assert not (tmp_path / "out").exists()
