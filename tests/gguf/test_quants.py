"""GGUF quantizers against the `gguf` package: its dequantizers read our bytes back, and for Q8_0
(which it also quantizes, following llama.cpp's reference) the bytes are the same."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantizers.errors import InvalidWeightError, UnknownSchemeError
from quantizers.gguf import GGUF_TYPES, dequantize_gguf, gguf_type, quantize_gguf, row_bytes

# Relative Frobenius error of N(0, 1) weights, an upper bound per type (4-bit ~ 0.1, 8-bit ~ 0.004).
_BOUNDS = {"Q8_0": 0.006, "Q6_K": 0.03, "Q5_K": 0.05, "Q4_K": 0.1, "Q5_0": 0.06, "Q5_1": 0.06,
           "F16": 1e-3, "BF16": 5e-3, "F32": 0.0}


def _weight(rows: int = 16, cols: int = 512, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    if rows < 5:
        return weight.half().float()
    weight[1, :64] = 0.0  # all-zero sub-blocks and super-block halves
    weight[2, 256:] = 0.25  # constant super-block: max == min in the asymmetric search
    weight[3, :32] *= 1e-4  # a tiny sub-block next to normal ones: its 6-bit scale rounds to 0
    weight[4] = weight[4].abs()  # all positive: the min is clamped to 0
    return weight.half().float()  # values an f16 source holds exactly


@pytest.mark.parametrize("name", sorted(GGUF_TYPES))
def test_round_trip_through_the_gguf_dequantizers(name: str) -> None:
    weight = _weight()
    packed = quantize_gguf(weight, name)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (16, row_bytes(name, 512))
    restored = dequantize_gguf(packed, name, (16, 512))
    error = float((restored - weight).norm() / weight.norm())
    assert error <= _BOUNDS[name], f"{name}: relative error {error:.4f}"
    # Zero rows stay zero and the constant block is reproduced closely.
    assert torch.count_nonzero(restored[1, :64]) == 0
    assert torch.allclose(restored[2, 256:], torch.full((256,), 0.25), atol=0.02)


def test_q8_0_bytes_equal_the_gguf_package_quantizer() -> None:
    weight = _weight(cols=1024)
    ours = quantize_gguf(weight, "Q8_0").numpy()
    theirs = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(ours, theirs)


def test_q4_k_bytes_decode_by_hand() -> None:
    """Read one Q4_K block by the published layout, independently of the gguf package."""
    weight = _weight(rows=1, cols=256, seed=3)
    block = quantize_gguf(weight, "Q4_K")[0]
    d = float(block[0:2].view(torch.float16))
    dmin = float(block[2:4].view(torch.float16))
    scales = block[4:16].to(torch.int32)
    qs = block[16:].to(torch.int32)
    values = []
    for j in range(8):
        if j < 4:
            sc, m = int(scales[j]) & 63, int(scales[j + 4]) & 63
        else:
            sc = (int(scales[j + 4]) & 15) | ((int(scales[j - 4]) >> 6) << 4)
            m = (int(scales[j + 4]) >> 4) | ((int(scales[j]) >> 6) << 4)
        chunk = qs[32 * (j // 2): 32 * (j // 2) + 32]
        codes = chunk & 15 if j % 2 == 0 else chunk >> 4
        values.append(d * sc * codes.float() - dmin * m)
    by_hand = torch.cat(values)
    assert torch.allclose(by_hand, dequantize_gguf(block[None], "Q4_K", (1, 256))[0], atol=1e-6)
    assert float((by_hand - weight[0]).norm() / weight[0].norm()) < 0.1


def test_quantization_is_deterministic_and_row_independent() -> None:
    weight = _weight(rows=40, cols=256)
    whole = quantize_gguf(weight, "Q6_K")
    assert torch.equal(whole, quantize_gguf(weight.clone(), "Q6_K"))
    assert torch.equal(whole[7:9], quantize_gguf(weight[7:9], "Q6_K"))


def test_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidWeightError, match="multiple of 256"):
        quantize_gguf(torch.zeros(2, 576), "Q4_K")
    with pytest.raises(UnknownSchemeError, match="valid types: F32, F16"):
        gguf_type("Q3_K_XL")
    assert gguf_type("q4_k").bits_per_weight == 4.5
