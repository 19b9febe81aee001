"""Whole work units on CUDA give the CPU's shard bytes (runs only where a GPU is present).

`tests/quantizers/test_gpu.py` compares single weights; this runs what a GPU worker runs: the
pipelined unit (reads ahead into pinned memory, copies on a side stream, writes and hashing behind
the kernels) on a small Llama-shaped checkpoint whose large weights take the compiled kernels
(>= 4M elements) and whose 2752-wide down_proj takes the awkward-shape fallback. Every output
shard must be byte-identical to the CPU's, and a data-free method other than rtn must give the same
bytes twice on the GPU (what resuming relies on: deterministic on a given device type).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from flows.pipeline import plan_conversion, unit_context
from flows.recipe import Recipe
from infra.storage import open_storage
from workers.convert_unit import convert_unit

pytestmark = pytest.mark.gpu

SCHEMES = ["W8A16", "W4A16", "W4A16_ASYM", "FP8", "FP8_BLOCK", "NVFP4A16", "MXFP4A16"]


def save_wide_llama(path: Path) -> Path:
    """One Llama layer, hidden 2048 (q/o 4.2M elements: compiled kernels), MLP 2752 (128 does not
    divide it: down_proj's int groups fall back to 64, FP4 to FP8 per channel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=2048, intermediate_size=2752, num_hidden_layers=1,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="40MB")
    return path


def convert_on(source: Path, recipe: Recipe, device: str, work: Path) -> dict[str, str]:
    """Every unit of `source` converted in this process on `device`: {shard file: SHA-256}."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan = plan_conversion(str(source), recipe, shard_size=8 * 10**6)
    context = unit_context(plan, open_storage(work), device)
    results = [convert_unit(unit, context) for unit in plan.units]
    assert {r.device.split(":")[0] for r in results} == {device}
    files = {r.file_name: r.sha256 for r in results}
    for shard in work.rglob("*.safetensors"):  # the staged bytes, hashed again here
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == files[shard.name], shard.name
    return files


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_wide_llama(tmp_path_factory.mktemp("wide-llama") / "model")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_units_on_cuda_match_cpu(wide_llama: Path, tmp_path: Path, scheme: str) -> None:
    recipe = Recipe.preset(scheme)
    cpu = convert_on(wide_llama, recipe, "cpu", tmp_path / "cpu")
    cuda = convert_on(wide_llama, recipe, "cuda", tmp_path / "cuda")
    assert len(cpu) >= 2
    assert cuda == cpu


@pytest.mark.parametrize("method", ["search", "hqq"])
def test_methods_repeat_on_cuda(wide_llama: Path, tmp_path: Path, method: str) -> None:
    recipe = Recipe.preset("W4A16", method=method)
    first = convert_on(wide_llama, recipe, "cuda", tmp_path / "first")
    assert convert_on(wide_llama, recipe, "cuda", tmp_path / "second") == first
    assert first != convert_on(wide_llama, Recipe.preset("W4A16"), "cuda", tmp_path / "rtn")
