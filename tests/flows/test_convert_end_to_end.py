"""End to end: real models through plan -> Ray workers -> finalize -> publish, then loaded back.

Local to local (the bundled MiniLM), local to S3 and S3 to S3 (tiny Llama- and Qwen-shaped models
in several shards, on a loopback S3 server). The output must load in transformers with
compressed-tensors and stay close to the original.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.pipeline import run_conversion
from flows.recipe import Recipe
from infra.publish import DEFAULT_MARKER
from infra.storage import open_storage
from tests.flows.conftest import download_dir, s3_storage, upload_dir

pytestmark = pytest.mark.usefixtures("local_ray")


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p = reference.float().log_softmax(-1)
    q = other.float().log_softmax(-1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean())


def _causal_lm_kl(original: Path, quantized: Path) -> float:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16).eval()(ids).logits
    assert torch.isfinite(b).all()
    return _kl(a, b)


@pytest.mark.parametrize(("scheme", "min_cosine"), [("W4A16", 0.9), ("W8A16", 0.999)])
def test_minilm_local_to_local_loads_and_embeds_like_the_original(minilm, tmp_path, scheme, min_cosine):
    from transformers import AutoModel, AutoTokenizer

    dest = tmp_path / "out"
    summary = run_conversion(minilm, str(dest), Recipe.preset(scheme), shard_size=30_000_000)
    assert summary.units == 3 and summary.quantized == 37
    assert (dest / DEFAULT_MARKER).exists() and not any((dest / ".staging").glob("**/*.*"))
    manifest = json.loads((dest / "quantfleet.json").read_text())
    assert manifest["plan_id"] == summary.plan_id
    assert len(manifest["shards"]) == 3
    # Each unit's wall time, device and Ray node (IP/id), and a per-node summary in the report.
    units = manifest["units"]
    assert [u["index"] for u in units] == [0, 1, 2]
    assert all(u["seconds"] > 0 and u["device"] == "cpu" and "/" in u["node"] for u in units)
    assert sum(u["bytes_in"] for u in units) == summary.bytes_in
    report = (dest / "report.md").read_text()
    assert "## Where it ran" in report and f"| {units[0]['node']} | cpu |" in report
    assert (dest / "1_Pooling" / "config.json").exists()  # side files in folders come along

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    text = tokenizer(["quantization from the ground up", "a cat sat on the mat"],
                     return_tensors="pt", padding=True)
    with torch.no_grad():
        original = AutoModel.from_pretrained(minilm).eval()(**text).last_hidden_state.mean(1)
        converted = AutoModel.from_pretrained(dest).eval()(**text).last_hidden_state.mean(1)
    cosine = torch.nn.functional.cosine_similarity(original, converted)
    assert bool((cosine > min_cosine).all()), cosine


def test_llama_local_to_s3_loads_within_kl_bound(tiny_llama, s3, tmp_path):
    uri, dest = s3_storage(s3, "llama-w4a16")
    summary = run_conversion(str(tiny_llama), uri, Recipe.preset("W4A16"), shard_size=1_000_000)
    assert summary.units > 1
    assert dest.exists(DEFAULT_MARKER)
    assert not any(i.key.startswith(".staging") for i in dest.list(""))
    local = download_dir(dest, tmp_path / "llama-w4a16")
    assert json.loads((local / "model.safetensors.index.json").read_text())["weight_map"]
    assert 0 < _causal_lm_kl(tiny_llama, local) < 0.05


def test_qwen_s3_to_s3_with_awkward_width(tiny_qwen, s3, tmp_path):
    source_uri, source = s3_storage(s3, "incoming/qwen")
    upload_dir(tiny_qwen, source)
    dest_uri, dest = s3_storage(s3, "published/qwen-w4a16")
    summary = run_conversion(source_uri, dest_uri, Recipe.preset("W4A16"), shard_size=2_000_000)
    local = download_dir(dest, tmp_path / "qwen")
    config = json.loads((local / "config.json").read_text())["quantization_config"]
    group_sizes = {g["weights"]["group_size"] for g in config["config_groups"].values()}
    assert group_sizes == {64, 128}  # 576-wide inputs use group 64, 1536-wide ones group 128
    assert "Shape adjustments" in summary.report
    assert 0 < _causal_lm_kl(tiny_qwen, local) < 0.05


@pytest.mark.parametrize("scheme", ["FP8", "NVFP4A16"])
def test_float_schemes_convert_and_load(tiny_llama, tmp_path, scheme):
    dest = tmp_path / scheme
    run_conversion(str(tiny_llama), str(dest), Recipe.preset(scheme), shard_size=1_000_000)
    bound = 0.01 if scheme == "FP8" else 0.05
    assert 0 < _causal_lm_kl(tiny_llama, dest) < bound


def test_the_same_conversion_twice_gives_identical_bytes(tiny_llama, tmp_path):
    from tests.flows.conftest import file_digests

    first, second = tmp_path / "a", tmp_path / "b"
    for dest in (first, second):
        run_conversion(str(tiny_llama), str(dest), Recipe.preset("W4A16"), shard_size=1_000_000)
    assert file_digests(open_storage(first)) == file_digests(open_storage(second))
