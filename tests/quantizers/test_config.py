from __future__ import annotations

import pytest
from compressed_tensors.quantization import QuantizationConfig

from quantizers import (
    UnknownSchemeError,
    UnsupportedSchemeError,
    config_groups,
    get_scheme,
    quantization_config,
    scheme_names,
)
from tests.quantizers.ct_reference import ct_scheme


def test_unknown_scheme_lists_every_valid_name() -> None:
    with pytest.raises(UnknownSchemeError) as error:
        get_scheme("W3A16")
    assert str(error.value) == (
        "unknown scheme 'W3A16'; valid schemes: W8A16, W4A16, W4A16_ASYM, FP8, FP8_BLOCK, "
        "NVFP4A16, MXFP4A16"
    )


def test_names_are_case_insensitive_with_aliases() -> None:
    assert get_scheme("w4a16") == get_scheme("W4A16")
    assert get_scheme("nvfp4") == get_scheme("NVFP4A16")


def test_options_change_group_size_symmetry_and_channel() -> None:
    assert get_scheme("W4A16", group_size=64).group_size == 64
    assert get_scheme("W4A16", symmetric=False).symmetric is False
    channel = get_scheme("W8A16", per_channel=True)
    assert (channel.strategy, channel.group_size) == ("channel", None)
    with pytest.raises(UnsupportedSchemeError, match="fixes the group size at 16"):
        get_scheme("NVFP4A16", group_size=32)
    with pytest.raises(UnsupportedSchemeError, match="symmetric only"):
        get_scheme("MXFP4A16", symmetric=False)


@pytest.mark.parametrize("name", scheme_names())
def test_config_groups_are_valid_compressed_tensors_configs(name: str) -> None:
    scheme = get_scheme(name)
    config = quantization_config([("model.layers.0.mlp.up_proj", scheme)], ignore=["lm_head"])
    parsed = QuantizationConfig.model_validate(config)
    group = parsed.config_groups["group_0"]
    assert group.weights == ct_scheme(scheme).weights
    assert group.format == scheme.format
    assert parsed.format == scheme.format
    assert parsed.ignore == ["lm_head"]


def test_several_formats_make_a_mixed_precision_config() -> None:
    config = quantization_config(
        [("a", get_scheme("W4A16")), ("b", get_scheme("FP8")), ("c", get_scheme("W4A16"))]
    )
    assert config["format"] == "mixed-precision"
    assert {g["format"] for g in config["config_groups"].values()} == {"pack-quantized", "float-quantized"}
    QuantizationConfig.model_validate(config)


def test_config_groups_read_back_every_scheme_and_its_targets() -> None:
    modules = [(f"model.layers.{i}.mlp.up_proj", get_scheme(name)) for i, name in enumerate(scheme_names())]
    modules.append(("model.layers.9.mlp.down_proj", get_scheme("W8A16", group_size=64)))
    groups = config_groups(quantization_config(modules))
    assert len(groups) == len(modules)
    by_target = {g.targets: g.scheme for g in groups}
    for module, scheme in modules:
        assert by_target[(module,)] == scheme.model_copy(update={"name": by_target[(module,)].name})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_activations": {"num_bits": 8, "type": "int"}}, "quantizes input_activations"),
        ({"format": "int-quantized"}, "format 'int-quantized' is not one of"),
        ({"weights": {"num_bits": 4, "type": "int", "strategy": "tensor"}}, "strategy"),
        ({"weights": {"num_bits": 3, "type": "int", "strategy": "channel"}}, "int4 and int8"),
    ],
)
def test_config_groups_refuse_what_no_format_of_ours_stores(change, message) -> None:
    config = quantization_config([("model.layers.0.mlp.up_proj", get_scheme("W4A16"))])
    config["config_groups"]["group_0"].update(change)
    with pytest.raises(UnsupportedSchemeError, match=message):
        config_groups(config)
