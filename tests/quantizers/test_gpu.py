"""The CUDA path gives the CPU path's bytes (runs only where a GPU is present).

Realistic shapes: 256x512 weights passed while an H200 gave other bytes than the CPU for an
8192x3072 one (W4A16_ASYM, MXFP4A16): one-ulp differences in a scale's division or log2 show up
only when enough groups are drawn. 1376 columns is awkward: 128 does not divide it, so int
schemes use groups of 32 and FP4 schemes fall back to FP8 per channel.
"""

from __future__ import annotations

import pytest
import torch

from quantizers import get_scheme, quantize, scheme_names

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 4096), (8192, 3072), (5120, 1376)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("name", scheme_names())
def test_cuda_matches_cpu(name: str, compile: bool, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    cpu = quantize(weight, get_scheme(name), compile=False)
    gpu = quantize(weight.cuda(), get_scheme(name), compile=compile)
    for suffix, tensor in gpu.tensors.items():
        assert tensor.device.type == "cuda"
        same = torch.equal(tensor.cpu().view(torch.uint8), cpu.tensors[suffix].view(torch.uint8))
        assert same, f"{name} {shape} {suffix}"
    assert torch.equal(gpu.dequantized.cpu(), cpu.dequantized)
    # The dequantized weight the codes kernel keeps for the probes: the same values on CUDA.
    kept = quantize(weight.cuda(), get_scheme(name), compile=compile, keep_dequantized=True)
    assert torch.equal(kept.dequantized.cpu(), cpu.dequantized), f"{name} {shape} kept"
