"""The awkward-shape rule: dimensions a group does not divide never crash, and stay loadable."""

from __future__ import annotations

import pytest
import torch

from quantizers import get_scheme, quantization_config, quantize, resolve_scheme, stored_specs
from tests.quantizers.ct_reference import decompress_with_ct


@pytest.mark.parametrize(
    ("columns", "group", "strategy"),
    [(576, 64, "group"), (1536, 128, "group"), (96, 32, "group"), (100, None, "channel"),
     (60, None, "channel")],
)
def test_int_group_falls_back_to_the_largest_dividing_group(columns, group, strategy) -> None:
    resolution = resolve_scheme(get_scheme("W4A16"), (32, columns))
    assert resolution.scheme.strategy == strategy
    assert resolution.scheme.group_size == group
    assert resolution.adjusted == (columns % 128 != 0)
    if resolution.adjusted:
        assert str(columns) in resolution.note


@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16"])
def test_fp4_falls_back_to_fp8_channel_when_the_block_does_not_divide(name: str) -> None:
    resolution = resolve_scheme(get_scheme(name), (64, 200 if name == "MXFP4A16" else 72))
    assert resolution.scheme.format == "float-quantized"
    assert resolution.scheme.strategy == "channel"
    assert "stored as FP8 with one scale per output channel" in resolution.note


@pytest.mark.parametrize("name", ["W4A16", "W8A16", "W4A16_ASYM", "FP8", "FP8_BLOCK", "NVFP4A16", "MXFP4A16"])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (100, 100), (33, 1000), (1, 3)])
def test_awkward_shapes_quantize_and_decompress_with_compressed_tensors(name, shape) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    result = quantize(weight, get_scheme(name), compile=False)
    specs = stored_specs(result.scheme, shape, "bfloat16")
    assert {s.suffix: (s.dtype, s.shape) for s in specs} == {
        k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in result.tensors.items()
    }
    assert torch.equal(decompress_with_ct(result.tensors, result.scheme), result.dequantized)


def test_adjusted_tensors_get_their_own_config_group() -> None:
    w4 = get_scheme("W4A16")
    normal = resolve_scheme(w4, (576, 1536)).scheme
    narrow = resolve_scheme(w4, (1536, 576)).scheme
    config = quantization_config(
        [("model.layers.0.mlp.up_proj", normal), ("model.layers.0.mlp.down_proj", narrow),
         ("model.layers.0.mlp.gate_proj", normal)],
        ignore=["lm_head"],
    )
    groups = config["config_groups"]
    assert groups["group_0"]["targets"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert groups["group_0"]["weights"]["group_size"] == 128
    assert groups["group_1"]["targets"] == ["model.layers.0.mlp.down_proj"]
    assert groups["group_1"]["weights"]["group_size"] == 64
    assert config["format"] == "pack-quantized"
