"""The evaluate step and the model gate through the real pipeline (local Ray, local destination)."""

from __future__ import annotations

import json

import pytest

from flows.gates import QualityGateFailed
from flows.pipeline import run_conversion
from flows.recipe import Recipe, RecipeError
from infra.publish import DEFAULT_MARKER

pytestmark = pytest.mark.usefixtures("local_ray")

EVAL = {"max_tokens": 512, "context": 256}


def test_a_failing_gate_publishes_nothing_and_says_why(tiny_llama, tmp_path) -> None:
    dest = tmp_path / "out"
    recipe = Recipe.preset("W4A16", gates={"max_mean_kl": 1e-12, "min_top1": 0.0}, evaluate=EVAL)
    with pytest.raises(QualityGateFailed) as caught:
        run_conversion(str(tiny_llama), str(dest), recipe, shard_size=2_000_000)
    message = str(caught.value)
    assert "not published" in message and "max_mean_kl" in message and "min_top1" not in message
    assert not (dest / DEFAULT_MARKER).exists()
    published = [p for p in dest.rglob("*") if p.is_file() and ".staging" not in p.parts]
    assert published == []  # nothing at the destination outside the staging area
    staged_reports = list((dest / ".staging").glob("*/report.md"))
    assert len(staged_reports) == 1 and "**FAIL**" in staged_reports[0].read_text()
    # Relaxing the model gate resumes from the staged shards and publishes.
    relaxed = Recipe.preset("W4A16", gates={"max_mean_kl": 1.0}, evaluate=EVAL)
    summary = run_conversion(str(tiny_llama), str(dest), relaxed, shard_size=2_000_000)
    assert summary.reused_units == summary.units and (dest / DEFAULT_MARKER).exists()


def test_an_evaluated_conversion_records_figures_gates_and_chart(tiny_llama, tmp_path) -> None:
    dest = tmp_path / "out"
    recipe = Recipe.preset("W8A16", evaluate=EVAL, gates={"max_output_error": 0.05, "min_top1": 0.5})
    summary = run_conversion(str(tiny_llama), str(dest), recipe, shard_size=2_000_000)
    assert summary.evaluation is not None and 0 < summary.evaluation.mean_kl < 0.01
    manifest = json.loads((dest / "quantfleet.json").read_text())
    assert manifest["evaluation"]["top1"] > 0.9 and "seconds" not in manifest["evaluation"]
    assert {g["gate"] for g in manifest["gates"]} >= {"max_output_error", "min_top1", "min_sqnr_db"}
    assert all(g["passed"] for g in manifest["gates"])
    quantized = [t for t in manifest["tensors"] if t["scheme"]]
    assert quantized and all(0 < t["output_error"] < 0.05 for t in quantized)
    assert 8 < manifest["totals"]["bits_per_weight"]["quantized"] < 8.5
    report = (dest / "report.md").read_text()
    assert "![per-layer error](per_layer_error.png)" in report and "mean KL divergence" in report
    assert "bits per weight" in report
    assert (dest / "per_layer_error.png").read_bytes().startswith(b"\x89PNG")


def test_a_tensor_output_error_gate_fails_the_unit(tiny_llama, tmp_path) -> None:
    from flows.execute import ConversionFailed

    recipe = Recipe.preset("W4A16", gates={"max_output_error": 1e-6})
    with pytest.raises(ConversionFailed, match="output error"):
        run_conversion(str(tiny_llama), str(tmp_path / "out"), recipe, shard_size=2_000_000)
    assert not (tmp_path / "out" / DEFAULT_MARKER).exists()


def test_recipe_yaml_accepts_evaluate_true_and_model_gates(tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("scheme: W4A16\nevaluate: true\ngates: {max_mean_kl: 0.05, min_top1: 0.9}\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.evaluates and recipe.evaluate.enabled and recipe.gates.max_mean_kl == 0.05
    path.write_text("scheme: W4A16\ngates: {min_top1: 1.5}\n")
    with pytest.raises(RecipeError, match="min_top1"):
        Recipe.from_yaml(path)
    # Model gates do not change what is converted, so they do not change the plan id.
    assert Recipe.preset("W4A16").plan_key() == recipe.plan_key()
