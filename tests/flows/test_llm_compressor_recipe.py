"""llm-compressor recipe files given to --recipe: translated where quantfleet does the same, refused
in one line where it would not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.recipe import Recipe, RecipeError

ATTENTION = "model.layers.0.self_attn.q_proj.weight"
MLP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
SHAPE = (256, 512)


def stage(modifier: dict[str, object], name: str = "QuantizationModifier") -> dict[str, object]:
    """A recipe as llm-compressor's examples write it: a stage, its modifiers, the modifier."""
    return {"quant_stage": {"quant_modifiers": {name: modifier}}}


def read(tmp_path: Path, data: object) -> Recipe:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return Recipe.from_yaml(path)


def chosen(recipe: Recipe, tensor: str) -> str | None:
    choice = recipe.choice_for(tensor, SHAPE)
    if choice is None:
        return None
    scheme, method = choice
    return f"{scheme.name} {scheme.strategy} {scheme.group_size} sym={scheme.symmetric} {method}"


def test_a_preset_scheme_with_targets_and_ignore(tmp_path) -> None:
    recipe = read(tmp_path, stage({"targets": "Linear", "scheme": "W4A16", "ignore": ["lm_head"]}))
    assert chosen(recipe, MLP) == "W4A16 group 128 sym=True rtn"
    assert chosen(recipe, "lm_head.weight") is None
    # llm-compressor's Linear never matches an embedding; vLLM loads MoE routers unquantized.
    assert chosen(recipe, "model.embed_tokens.weight") is None
    assert chosen(recipe, "model.layers.0.mlp.gate.weight") is None
    # The modifier may also stand alone, or in a modifiers group without a stage.
    for data in ({"QuantizationModifier": {"scheme": "W8A16"}},
                 {"quant_modifiers": {"QuantizationModifier": {"scheme": "W8A16"}}}):
        assert chosen(read(tmp_path, data), MLP) == "W8A16 group 128 sym=True rtn"


def test_schemes_by_target_and_config_groups_where_the_later_group_wins(tmp_path) -> None:
    by_target = read(tmp_path, stage({"scheme": {"W8A16": ["re:.*self_attn.*"], "W4A16": ["re:.*mlp.*"]},
                                      "ignore": ["re:.*down_proj$"]}))
    assert chosen(by_target, ATTENTION) == "W8A16 group 128 sym=True rtn"
    assert chosen(by_target, MLP) == "W4A16 group 128 sym=True rtn"
    assert chosen(by_target, DOWN) is None  # the ignore list covers every scheme

    int8_channel = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    int4_asym_64 = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64,
                    "observer": "memoryless_minmax"}
    groups = read(tmp_path, stage({"ignore": ["lm_head"], "config_groups": {
        "group_0": {"targets": ["re:.*down_proj$"], "weights": int8_channel},
        "group_1": {"targets": ["Linear"], "weights": int4_asym_64, "input_activations": None},
    }}))
    # group_1 comes later and matches every Linear: it wins over group_0 for down_proj too.
    assert chosen(groups, DOWN) == chosen(groups, MLP) == "W4A16 group 64 sym=False rtn"
    assert chosen(groups, "lm_head.weight") is None
    assert chosen(groups, "model.embed_tokens.weight") is None
    swapped = read(tmp_path, stage({"config_groups": {
        "group_0": {"targets": ["Linear"], "weights": int4_asym_64},
        "group_1": {"targets": ["re:.*down_proj$"], "weights": int8_channel},
    }}))
    assert chosen(swapped, DOWN) == "W8A16 channel None sym=True rtn"
    assert chosen(swapped, MLP) == "W4A16 group 64 sym=False rtn"

    floats = {
        "FP8 channel None sym=True rtn": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "FP8_BLOCK block None sym=True rtn": {"num_bits": 8, "type": "float", "strategy": "block",
                                              "block_structure": [128, 128]},
        "NVFP4A16 tensor_group 16 sym=True rtn": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                                  "group_size": 16},
        "MXFP4A16 group 32 sym=True rtn": {"num_bits": 4, "type": "float", "strategy": "group",
                                           "group_size": 32},
    }
    for expected, weights in floats.items():
        recipe = read(tmp_path, stage({"config_groups": {"g": {"targets": ["Linear"], "weights": weights}}}))
        assert chosen(recipe, MLP) == expected


@pytest.mark.parametrize(("data", "message"), [
    (stage({"scheme": "W4A16"}, "GPTQModifier"),
     "GPTQModifier: needs calibration data, which quantfleet does not take"),
    ({"quant_stage": {"quant_modifiers": {"SmoothQuantModifier": {"smoothing_strength": 0.8},
                                          "QuantizationModifier": {"scheme": "W4A16"}}}},
     "SmoothQuantModifier: needs calibration data"),
    (stage({"scheme": "W4A16", "kv_cache_scheme": {"num_bits": 8, "type": "float"}}),
     "QuantizationModifier.kv_cache_scheme: quantfleet quantizes weights only"),
    (stage({"scheme": "W4A16", "observer": "mse"}),
     "QuantizationModifier.observer: not a setting quantfleet reads"),
    (stage({"scheme": "W4A16", "config_groups": {}}),
     "QuantizationModifier: give scheme or config_groups (one of them)"),
    (stage({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                       "strategy": "tensor"},
                                    "input_activations": {"num_bits": 8, "type": "float"}}}}),
     "QuantizationModifier.config_groups.g.input_activations: quantfleet quantizes weights only"),
    (stage({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                       "strategy": "tensor"}}}}),
     "QuantizationModifier.config_groups.g.weights: float 8-bit weights by tensor are not stored here"),
    (stage({"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "actorder": "group"}}}}),
     "QuantizationModifier.config_groups.g.weights.actorder: a GPTQ setting, which needs calibration data"),
    (stage({"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "observer": "mse"}}}}),
     "QuantizationModifier.config_groups.g.weights.observer: 'mse' is not reproduced"),
    (stage({"config_groups": {"g": {"targets": 7, "weights": {"num_bits": 8, "strategy": "channel"}}}}),
     "QuantizationModifier.config_groups.g.targets: expected a module name or a list of them"),
    (stage({"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "strategy": "channel", "dynamic": True}}}}),
     "QuantizationModifier.config_groups.g.weights.dynamic: weights are quantized once"),
    # What quantfleet's own recipes refuse is refused here too.
    (stage({"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 256}}}}),
     "scheme W4A16: group size 256: int weights are stored in groups of 128, 64, 32"),
    (stage({"scheme": "W8A8"}), "unknown scheme 'W8A8' (it quantizes activations too; quantfleet "
                                "quantizes weights only, activations stay 16-bit); valid schemes: W8A16"),
])
def test_what_quantfleet_would_do_differently_is_refused_in_one_line(tmp_path, data, message) -> None:
    with pytest.raises(RecipeError) as refused:
        read(tmp_path, data)
    assert str(refused.value).startswith(f"{tmp_path / 'recipe.yaml'}: {message}"), refused.value
    assert "\n" not in str(refused.value)


@pytest.mark.usefixtures("local_ray")
def test_a_published_config_given_back_as_a_recipe_converts_to_the_same_bytes(tiny_llama, tmp_path) -> None:
    """The quantization_config a conversion writes is llm-compressor's config_groups form: handed
    back inside a QuantizationModifier it must choose the same scheme for every weight."""
    ours = tmp_path / "ours.yaml"
    ours.write_text("scheme: W4A16\ngroup_size: 64\noverrides:\n"
                    "  - targets: ['re:.*down_proj$']\n    scheme: W8A16\n    per_channel: true\n")
    first = tmp_path / "first"
    assert main(["convert", str(tiny_llama), str(first), "--recipe", str(ours), "--no-prefect"]) == 0
    written = json.loads((first / "config.json").read_text())["quantization_config"]
    assert len(written["config_groups"]) == 2

    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(yaml.safe_dump(stage({"config_groups": written["config_groups"],
                                            "ignore": written["ignore"]})))
    second = tmp_path / "second"
    assert main(["convert", str(tiny_llama), str(second), "--recipe", str(theirs), "--no-prefect"]) == 0
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    assert shards == sorted(p.name for p in second.glob("*.safetensors")) and shards
    for name in shards:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    again = json.loads((second / "config.json").read_text())["quantization_config"]
    assert again["config_groups"] == written["config_groups"]
