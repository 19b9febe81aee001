"""Source dequantizers against independent reference math, and their refusals."""

from __future__ import annotations

import pytest
import torch

from quantizers import InvalidSourceError, get_scheme, quantize
from quantizers.sources import dequantize_source
from tests.sources.builders import fp8_block_quantize


def test_block_fp8_matches_tile_by_tile_reference_with_partial_edge_tiles() -> None:
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, scale = fp8_block_quantize(weight)
    assert scale.shape == (3, 2)
    expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_source("block-fp8", {"weight": q, "weight_scale_inv": scale}, name="w",
                                block=(128, 128), dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, (q.float() * expanded).to(dtype))


def test_block_fp8_refuses_a_misshaped_scale_naming_the_tensor() -> None:
    q, scale = fp8_block_quantize(torch.randn(256, 256))
    expected = r"layer\.w: weight_scale_inv has shape \[2, 1\], expected \[2, 2\]"
    with pytest.raises(InvalidSourceError, match=expected):
        dequantize_source("block-fp8", {"weight": q, "weight_scale_inv": scale[:, :1]}, name="layer.w",
                          block=(128, 128))


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A16", "FP8", "FP8_BLOCK", "NVFP4A16",
                                    "MXFP4A16"])
def test_compressed_tensors_source_dequantizes_as_our_own_result(scheme) -> None:
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    result = quantize(weight, get_scheme(scheme))
    got = dequantize_source("compressed-tensors", dict(result.tensors), name="w", scheme=result.scheme)
    assert torch.equal(got, result.dequantized.float())


def test_gpt_oss_mxfp4_blocks_low_nibble_first() -> None:
    blocks = torch.zeros(2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2F  # low nibble 0xF = -6, high nibble 0x2 = 1.0
    scales = torch.tensor([[128], [127]], dtype=torch.uint8)  # 2^1, 2^0
    got = dequantize_source("mxfp4-blocks", {"blocks": blocks, "scales": scales}, name="w")
    assert got.shape == (2, 32) and got[0, 0] == -12.0 and got[0, 1] == 2.0 and got[1].abs().sum() == 0


@pytest.mark.parametrize(("compile_mode", "dtypes"), [
    ("0", (torch.bfloat16, torch.float16, torch.float32)),
    # Compiling costs seconds per kernel on 2 cores: both kernels (bf16 on the bits, the others) once.
    pytest.param("1", (torch.bfloat16, torch.float32), marks=pytest.mark.slow),
])
def test_block_fp8_every_code_and_wide_scales_match_torch(compile_mode, dtypes, monkeypatch) -> None:
    # The table lookup and the rounding on the bits (eager, and compiled as large weights are)
    # against torch's own fp8 -> float32 conversion, for every non-NaN code and scales over 12 decades.
    monkeypatch.setenv("QUANTFLEET_COMPILE", compile_mode)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    generator = torch.Generator().manual_seed(5)
    weight = codes[torch.randint(0, len(codes), (256, 384), generator=generator)].view(torch.float8_e4m3fn)
    weight[0, :254] = codes.view(torch.float8_e4m3fn)
    scale = torch.rand(2, 3, generator=generator) * 10.0 ** torch.randint(-8, 4, (2, 3), generator=generator)
    expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    for dtype in dtypes:
        got = dequantize_source("block-fp8", {"weight": weight, "weight_scale_inv": scale}, name="w",
                                block=(128, 128), dtype=dtype)
        want = (weight.float() * expanded).to(dtype)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype
