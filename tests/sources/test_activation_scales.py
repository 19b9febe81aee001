"""A compressed-tensors source that quantizes activations or the KV cache too (llm-compressor's FP8
preset with static activation scales, W8A8, NVFP4 with an activation global scale): its weights
convert like any other, and the scales of its activations, which describe nothing in a weight-only
result, are not copied into it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.flows.conftest import save_tiny_model
from tests.sources.builders import run_plain


def _with_static_activations(fp8: Path, out: Path) -> int:
    """`fp8` (a weight-only FP8 result) as llm-compressor's FP8 preset with an FP8 KV cache stores
    it: an `input_scale` per quantized Linear, `k_scale`/`v_scale` per attention. Returns how many
    such scales it added."""
    out.mkdir()
    for side in fp8.glob("*.json"):
        if side.name == "config.json":
            config = json.loads(side.read_text())
            quantization = config["quantization_config"]
            for group in quantization["config_groups"].values():
                group["input_activations"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                              "symmetric": True, "dynamic": False}
            quantization["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                               "symmetric": True, "dynamic": False}
            (out / side.name).write_text(json.dumps(config, indent=2))
        elif not side.name.startswith(("_", "quantfleet")):
            shutil.copy(side, out / side.name)
    added = 0
    for shard in fp8.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in list(tensors):
            if name.endswith(".weight_scale"):
                tensors[name.replace(".weight_scale", ".input_scale")] = torch.tensor([0.02])
                added += 1
            if name.endswith("self_attn.k_proj.weight_scale"):
                attention = name.removesuffix(".k_proj.weight_scale")
                tensors[f"{attention}.k_scale"] = torch.tensor(0.1)
                tensors[f"{attention}.v_scale"] = torch.tensor(0.1)
                added += 2
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
    return added


def test_activation_and_kv_cache_scales_of_the_source_are_not_copied(tmp_path) -> None:
    llama = save_tiny_model("llama", tmp_path / "llama")
    fp8 = tmp_path / "fp8"
    run_plain(str(llama), str(fp8), "FP8")
    static = tmp_path / "fp8-static"
    added = _with_static_activations(fp8, static)
    assert added == 14 + 2 * 2  # 7 Linears and one attention in each of 2 layers

    from_static, from_weights_only = tmp_path / "w4-static", tmp_path / "w4"
    plan = run_plain(str(static), str(from_static), "W4A16")
    run_plain(str(fp8), str(from_weights_only), "W4A16")
    assert plan.source is not None and plan.source.activation_scales_dropped == added
    manifest = json.loads((from_static / "quantfleet.json").read_text())
    assert manifest["source"]["activation_scales_dropped"] == added
    # The weights were read the same, and nothing of the source's activation scheme was kept:
    # the result is the same bytes as from the weight-only source.
    with safe_open(from_static / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert not [n for n in names if n.endswith(("input_scale", "k_scale", "v_scale"))], sorted(names)
    result = (from_static / "model.safetensors").read_bytes()
    assert result == (from_weights_only / "model.safetensors").read_bytes()
    # A source without them says nothing about them (its manifest keeps its bytes).
    plain = json.loads((from_weights_only / "quantfleet.json").read_text())
    assert "activation_scales_dropped" not in plain["source"]
