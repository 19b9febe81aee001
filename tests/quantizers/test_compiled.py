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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["W8A16", "W4A16_ASYM"])
def test_int_kernels_compile_without_falling_back(name: str, caplog: pytest.LogCaptureFixture) -> None:
    # The bit width is baked into each kernel, not a (symbolic) argument Dynamo must trace.
    from quantizers import kernels

    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="quantizers.kernels"):
        quantize(weight, get_scheme(name), compile=True)
    assert not caplog.records
    assert not kernels._broken


def test_compile_failure_is_one_line_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from quantizers import kernels

    def failing_compile(function, **options):  # noqa: ANN001, ANN003, ANN202 - stands in for a broken compiler
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("Dynamo failed to run FX node\n" + "explanation line\n" * 14)
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_broken", set())
    monkeypatch.setattr(kernels, "_warned", False)
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    with caplog.at_level("WARNING", logger="quantizers.kernels"):
        first = quantize(weight, get_scheme("W4A16"), compile=True)
        quantize(weight, get_scheme("FP8"), compile=True)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "\n" not in warnings[0].getMessage()
    assert "Dynamo failed to run FX node" in warnings[0].getMessage()
    eager = quantize(weight, get_scheme("W4A16"), compile=False)
    assert torch.equal(first.tensors["weight_packed"], eager.tensors["weight_packed"])


def test_a_plan_that_compiles_anyway_compiles_its_mid_sized_tensors_too(monkeypatch) -> None:
    from quantizers.kernels import (
        COMPILE_MIN_ELEMENTS,
        PLAN_COMPILE_MIN_ELEMENTS,
        compile_floor,
        compile_floor_for,
        compiles,
    )

    monkeypatch.setenv("QUANTFLEET_COMPILE", "auto")
    expert = 768 * 2048  # a routed expert of Qwen3-30B-A3B
    assert PLAN_COMPILE_MIN_ELEMENTS <= expert < COMPILE_MIN_ELEMENTS
    assert compile_floor_for([expert, 2048 * 4096]) == PLAN_COMPILE_MIN_ELEMENTS  # q_proj compiles
    assert compile_floor_for([expert, 1000]) == COMPILE_MIN_ELEMENTS  # a small model compiles nothing
    assert compile_floor_for([]) == COMPILE_MIN_ELEMENTS
    assert not compiles(expert)
    with compile_floor(PLAN_COMPILE_MIN_ELEMENTS):
        assert compiles(expert) and not compiles(PLAN_COMPILE_MIN_ELEMENTS - 1)
    assert not compiles(expert)  # the floor is the block's only


def test_compiling_lifts_dynamos_recompile_limit_above_what_the_kernels_need() -> None:
    # Past the limit Dynamo would run a kernel eagerly without a word: for a method's step, a
    # near-tie's bytes would then depend on what the process compiled before.
    from quantizers.kernels import RECOMPILE_LIMIT

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    quantize(weight, get_scheme("W4A16"), compile=True)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT > 8


def _kept_and_dequantized(weight: torch.Tensor, name: str, compile: bool, method: str = "rtn") -> None:
    scheme = get_scheme(name)
    plain = quantize(weight, scheme, compile=compile, method=method)
    kept = quantize(weight, scheme, compile=compile, method=method, keep_dequantized=True)
    assert kept.holds_dequantized and not plain.holds_dequantized
    for suffix, tensor in plain.tensors.items():  # keeping changes nothing stored
        assert torch.equal(tensor.view(torch.uint8), kept.tensors[suffix].view(torch.uint8)), suffix
    expected = dequantize(kept.tensors, kept.scheme, compile=False)
    assert kept.dequantized.dtype == expected.dtype and kept.dequantized.is_contiguous()
    # The same values; an int code's zero may carry the other sign (no product or sum can tell).
    assert torch.equal(kept.dequantized, expected), (name, weight.dtype)
    assert not kept.dequantized.isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_kept_dequantized_weight_is_what_dequantize_gives(dtype: torch.dtype) -> None:
    # What the probes measure: the kernel's own dequantized values, exactly what `dequantize`
    # gives for the stored tensors, on a shape with partial FP8 tiles.
    weight = (torch.randn(320, 512, generator=torch.Generator().manual_seed(9)) * 0.05).to(dtype)
    weight[4, :32] = 0.0
    weight[5, :16] = -1e-9
    for name in scheme_names():
        _kept_and_dequantized(weight, name, compile=False)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method"), [(n, "rtn") for n in scheme_names()]
                         + [("NVFP4A16", "search"), ("W4A16_ASYM", "hqq")])
def test_the_compiled_kept_dequantized_weight_is_what_dequantize_gives(name: str, method: str) -> None:
    weight = (torch.randn(320, 512, generator=torch.Generator().manual_seed(10)) * 0.05).to(torch.bfloat16)
    weight[4, :32] = 0.0
    _kept_and_dequantized(weight, name, compile=True, method=method)
