"""A small synthetic checkpoint (Kimi-K2 layout in bf16, shrunk) converts end to end on Ray,
publishes, and verifies; the block-FP8 variant is refused until FP8 sources are supported."""

from __future__ import annotations

import json

import pytest

from flows.pipeline import SourceError, plan_conversion, run_conversion
from flows.recipe import Recipe
from flows.versions import verify_uri
from infra.storage import open_storage

SMALL = ("hidden=256&intermediate=512&moe_intermediate=128&experts=4&heads=2&q_lora_rank=128"
         "&kv_lora_rank=128&qk_nope_head_dim=64&qk_rope_head_dim=64&v_head_dim=64&vocab=512&layers=2")


def test_small_synthetic_kimi_converts_publishes_and_verifies(local_ray, tmp_path):
    source = f"synthetic://kimi-k2-bf16?{SMALL}"
    dest = tmp_path / "out"
    summary = run_conversion(source, str(dest), Recipe.preset("W4A16"), shard_size=300_000)
    assert summary.units > 3 and summary.reused_units == 0
    manifest = json.loads((dest / "quantfleet.json").read_text())
    experts = [t for t in manifest["tensors"] if ".mlp.experts." in t["name"]]
    assert len(experts) == 4 * 3 and all(t["scheme"] and t["sqnr_db"] > 15 for t in experts)
    assert manifest["source"]["uri"] == open_storage(source).uri()
    config = json.loads((dest / "config.json").read_text())
    assert config["n_routed_experts"] == 4 and "quantization_config" in config
    reports = verify_uri(str(dest))
    assert [r.ok for r in reports] == [True]


def test_block_fp8_variant_is_refused_in_one_line():
    refused = r"config\.json\?.*: the source is already quantized \(quant_method 'fp8'\)"
    with pytest.raises(SourceError, match=refused):
        plan_conversion(f"synthetic://kimi-k2?{SMALL}", Recipe.preset("W4A16"))
