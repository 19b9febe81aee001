"""The compiled kernels give bit-identical results to the eager ones (and so to compressed-tensors).

Compiling costs seconds per kernel on 2 cores, so this covers one dtype per scheme, on a shape
that exercises partial FP8 blocks, plus fp16 for the int path whose rounding differs.
"""

from __future__ import annotations

import pytest
import torch

from quantizers import dequantize, get_scheme, quantize, scheme_names


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "dtype"),
    [(n, torch.bfloat16) for n in scheme_names()] + [("W4A16", torch.float16), ("FP8", torch.float32)],
)
def test_compiled_equals_eager(name: str, dtype: torch.dtype) -> None:
    weight = (torch.randn(320, 512, generator=torch.Generator().manual_seed(8)) * 0.05).to(dtype)
    weight[4, :32] = 0.0
    scheme = get_scheme(name)
    eager = quantize(weight, scheme, compile=False)
    compiled = quantize(weight, scheme, compile=True)
    for suffix, tensor in eager.tensors.items():
        assert torch.equal(tensor.view(torch.uint8), compiled.tensors[suffix].view(torch.uint8)), suffix
    eager_values = dequantize(eager.tensors, eager.scheme, compile=False)
    compiled_values = dequantize(eager.tensors, eager.scheme, compile=True)
    assert torch.equal(eager_values, compiled_values)
