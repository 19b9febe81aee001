"""Edge values: zero groups, subnormals, outliers, NaN/Inf, and tensors that are not quantized."""

from __future__ import annotations

import pytest
import torch

from quantizers import InvalidWeightError, get_scheme, quantize, scheme_names, weight_error
from tests.quantizers.ct_reference import compress_with_ct


@pytest.mark.parametrize("name", scheme_names())
def test_all_zero_weight_gets_eps_scales_and_dequantizes_to_zero(name: str) -> None:
    weight = torch.zeros(64, 256, dtype=torch.bfloat16)
    result = quantize(weight, get_scheme(name), compile=False)
    scale = result.tensors["weight_scale"]
    if scale.dtype == torch.uint8:  # MX: exponent of the eps scale 2^0 for zero blocks... see below
        assert torch.isfinite(scale.float()).all()
    else:
        expected_eps = 0.125 if scale.dtype == torch.float8_e4m3fn else torch.finfo(torch.bfloat16).eps
        assert torch.all(scale.float() == expected_eps)
    assert torch.count_nonzero(result.dequantized) == 0


@pytest.mark.parametrize("name", scheme_names())
def test_subnormal_and_outlier_values_match_compressed_tensors(name: str) -> None:
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(5)) * 0.01
    weight[0, :64] = 1e-40  # float32 subnormals
    weight[1, 3] = 3e4  # a huge outlier in a group of small values
    weight[2, :] = -weight[2, :].abs()  # an all-negative row
    weight = weight.to(torch.float32)
    scheme = get_scheme(name)
    result = quantize(weight, scheme, compile=False)
    theirs = compress_with_ct(weight, scheme)
    for suffix, tensor in result.tensors.items():
        assert torch.equal(tensor.view(torch.uint8), theirs[suffix].view(torch.uint8)), suffix
    assert torch.isfinite(result.dequantized).all()
    # The outlier itself survives: absmax scaling represents the largest value (nearly) exactly.
    assert abs(float(result.dequantized[1, 3]) - 3e4) / 3e4 < 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["W4A16", "FP8", "NVFP4A16", "MXFP4A16"])
def test_non_finite_weight_is_an_error_naming_the_tensor(name: str, bad: float) -> None:
    weight = torch.randn(16, 128, dtype=torch.bfloat16)
    weight[7, 42] = bad
    with pytest.raises(InvalidWeightError) as error:
        quantize(weight, get_scheme(name), name="model.layers.3.mlp.down_proj.weight", compile=False)
    message = str(error.value)
    assert message.startswith("model.layers.3.mlp.down_proj.weight: 1 non-finite value(s)")
    assert "row 7, column 42" in message


@pytest.mark.parametrize(
    ("shape", "needle"),
    [((128,), "only 2-D weights are quantized, this one has shape [128]"),
     ((2, 3, 4), "only 2-D weights are quantized, this one has shape [2, 3, 4]"),
     ((0, 128), "empty weight of shape [0, 128] cannot be quantized"),
     ((64, 0), "empty weight of shape [64, 0] cannot be quantized")],
)
def test_refused_shapes_get_a_clear_message(shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(InvalidWeightError) as error:
        quantize(torch.zeros(shape), get_scheme("W4A16"), name="model.norm.weight")
    assert str(error.value) == (
        f"model.norm.weight: {needle} (the pipeline keeps such tensors unquantized)"
    )


def test_integer_weights_are_refused() -> None:
    with pytest.raises(InvalidWeightError, match="dtype int32 is not quantized"):
        quantize(torch.zeros(8, 8, dtype=torch.int32), get_scheme("FP8"), name="x.weight")


@pytest.mark.parametrize("name", scheme_names())
def test_more_bits_means_less_error(name: str) -> None:
    weight = torch.randn(128, 512, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    error = weight_error(weight, quantize(weight, get_scheme(name), compile=False).dequantized)
    # Bounds from the Gaussian theory of each grid, with margin: 8-bit ints ~ 40 dB, 4-bit ~ 20 dB.
    minimum = {"W8A16": 38, "FP8": 28, "FP8_BLOCK": 28}.get(name, 15)
    assert error.sqnr_db > minimum
    assert error.cosine > 0.98
