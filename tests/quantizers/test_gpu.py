"""The CUDA path gives the CPU path's bytes (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from quantizers import get_scheme, quantize, scheme_names

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("name", scheme_names())
def test_cuda_matches_cpu(name: str, compile: bool) -> None:
    weight = (torch.randn(256, 512, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    cpu = quantize(weight, get_scheme(name), compile=False)
    gpu = quantize(weight.cuda(), get_scheme(name), compile=compile)
    for suffix, tensor in gpu.tensors.items():
        assert tensor.device.type == "cuda"
        assert torch.equal(tensor.cpu().view(torch.uint8), cpu.tensors[suffix].view(torch.uint8)), suffix
    assert torch.equal(gpu.dequantized.cpu(), cpu.dequantized)
