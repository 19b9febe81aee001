"""A small synthetic checkpoint (Kimi-K2 layout in bf16, shrunk) converts end to end on Ray,
publishes, and verifies; the block-FP8 variant, as Kimi-K2 is published, plans as a quantized
source whose weights are dequantized on the workers."""

from __future__ import annotations

import json

from flows.pipeline import plan_conversion, run_conversion
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


def test_block_fp8_variant_plans_as_a_dequantized_source():
    plan = plan_conversion(f"synthetic://kimi-k2?{SMALL}", Recipe.preset("W4A16"))
    assert plan.source is not None and plan.source.quantized and plan.source.format.startswith("block-FP8")
    jobs = list(plan.jobs())
    assert not any(job.name.endswith("weight_scale_inv") for job in jobs)  # scales are parts, not outputs
    experts = [job for job in jobs if ".mlp.experts." in job.name]
    assert experts and all(job.source is not None and job.scheme is not None for job in experts)


def test_the_compile_floor_follows_the_plan_not_the_process(tmp_path):
    # Kimi-K2's own sizes compile (7168-wide weights), so its plan lowers the floor for its
    # 2048x7168 experts too; the shrunk model's tensors all stay eager. Each unit's context
    # carries the floor to the workers.
    from flows.pipeline import unit_context
    from quantizers.kernels import COMPILE_MIN_ELEMENTS, PLAN_COMPILE_MIN_ELEMENTS

    small = plan_conversion(f"synthetic://kimi-k2-bf16?{SMALL}", Recipe.preset("W4A16"))
    full = plan_conversion("synthetic://kimi-k2-bf16?layers=2", Recipe.preset("W4A16"))
    assert small.compile_floor() == COMPILE_MIN_ELEMENTS
    assert full.compile_floor() == PLAN_COMPILE_MIN_ELEMENTS
    context = unit_context(full, open_storage(str(tmp_path)), "cpu")
    assert context.compile_min_elements == PLAN_COMPILE_MIN_ELEMENTS
