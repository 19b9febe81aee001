"""Byte compatibility with the installed compressed-tensors package, for every scheme.

Two checks per scheme and weight dtype: (1) compressed-tensors decompresses our stored tensors to
exactly our dequantized weight; (2) quantizing the same weight with compressed-tensors' functions
gives bit-identical stored tensors.
"""

from __future__ import annotations

import pytest
import torch

from quantizers import get_scheme, quantize, scheme_names
from tests.quantizers.ct_reference import compress_with_ct, decompress_with_ct

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _weight(dtype: torch.dtype, rows: int = 96, columns: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=generator) * 0.02
    # Outliers, an all-zero row and group, tiny values and negative values that round to zero.
    w[3, 7] = 1.5
    w[5] = 0.0
    w[9, :32] = 0.0
    w[11, 40:48] = -1e-6
    w[13, 64:96] *= 1e-3
    return w.to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", scheme_names())
def test_compressed_tensors_decompresses_to_our_dequantized(name: str, dtype: torch.dtype) -> None:
    scheme = get_scheme(name)
    result = quantize(_weight(dtype), scheme, compile=False)
    theirs = decompress_with_ct(result.tensors, result.scheme)
    assert theirs.dtype == result.dequantized.dtype
    assert torch.equal(theirs, result.dequantized)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", scheme_names())
def test_stored_tensors_are_bit_identical_to_compressed_tensors(
    name: str, dtype: torch.dtype
) -> None:
    weight = _weight(dtype, seed=1)
    scheme = get_scheme(name)
    ours = quantize(weight, scheme, compile=False).tensors
    theirs = compress_with_ct(weight, scheme)
    assert set(ours) == set(theirs)
    for suffix in ours:
        assert _same_bits(ours[suffix], theirs[suffix]), suffix


@pytest.mark.parametrize("name", ["W4A16", "W8A16", "FP8_BLOCK"])
def test_ragged_shapes_match_compressed_tensors(name: str) -> None:
    # 200 rows and 384 columns: FP8 blocks are partial at both edges; int groups divide.
    weight = _weight(torch.bfloat16, rows=200, columns=384, seed=2)
    scheme = get_scheme(name)
    ours = quantize(weight, scheme, compile=False).tensors
    theirs = compress_with_ct(weight, scheme)
    for suffix in ours:
        assert _same_bits(ours[suffix], theirs[suffix]), suffix
