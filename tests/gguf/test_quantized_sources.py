"""GGUF from a quantized source (block-FP8 here, as Qwen3's and Llama's FP8 releases ship):
written from the dense weights the source means, without a bf16 copy.

- Every GGUF tensor equals the one written from the source's dequantized bf16 twin, and no scale
  tensor of the source reaches the GGUF; the report names the source format.
- llama.cpp loads it and generates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import run_conversion
from flows.recipe import Recipe
from tests.gguf.models import save_gguf_source
from tests.llamacpp import llama_cpp, llama_cpp_unavailable
from tests.sources.builders import save_block_fp8

pytestmark = pytest.mark.usefixtures("local_ray")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="module")
def fp8_and_twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8-gguf")
    bf16 = save_gguf_source("llama", root / "bf16", layers=2)
    save_block_fp8(bf16, root / "fp8", root / "twin")
    for name in TOKENIZER:
        if (bf16 / name).exists():
            for target in (root / "fp8", root / "twin"):
                shutil.copy(bf16 / name, target / name)
    return root / "fp8", root / "twin"


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(str(path)).tensors}


def test_block_fp8_source_to_gguf_equals_its_dequantized_twin(fp8_and_twin, tmp_path: Path) -> None:
    fp8, twin = fp8_and_twin
    recipe = Recipe.preset("Q4_K_M", format="gguf", name="tiny")
    run_conversion(str(fp8), str(tmp_path / "from-fp8"), recipe)
    run_conversion(str(twin), str(tmp_path / "from-twin"), recipe)
    ours = _tensors(tmp_path / "from-fp8" / "model.gguf")
    theirs = _tensors(tmp_path / "from-twin" / "model.gguf")
    assert ours == theirs and not [n for n in ours if "scale" in n]
    assert any(kind == "Q4_K" for kind, _ in ours.values())
    assert "block-FP8" in (tmp_path / "from-fp8" / "report.md").read_text()

    if llama_cpp_unavailable():
        pytest.skip(llama_cpp_unavailable() or "-")
    model = llama_cpp().Llama(str(tmp_path / "from-fp8" / "model.gguf"), n_ctx=64, n_threads=2)
    try:
        assert model.generate("The for statement", max_tokens=4, temperature=0.0, seed=0)
    finally:
        model.close()
