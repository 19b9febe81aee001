from __future__ import annotations

import math

import torch

from quantizers import weight_error


def test_identical_tensors_are_perfect() -> None:
    w = torch.randn(64, 64)
    error = weight_error(w, w.clone())
    assert error.sqnr_db == math.inf
    assert error.relative_error == 0.0
    assert abs(error.cosine - 1.0) < 1e-12
    assert error.max_abs_error == 0.0


def test_figures_match_their_definitions() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(300, 70, generator=generator, dtype=torch.float64)
    noisy = w + 0.1 * torch.randn(300, 70, generator=generator, dtype=torch.float64)
    error = weight_error(w.to(torch.float32), noisy.to(torch.float32))
    w32, n32 = w.float().double(), noisy.float().double()
    diff = w32 - n32
    assert math.isclose(error.sqnr_db, 10 * math.log10(float((w32**2).sum() / (diff**2).sum())), rel_tol=1e-6)
    assert math.isclose(error.relative_error, float(diff.norm() / w32.norm()), rel_tol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(w32.flatten(), n32.flatten(), dim=0)
    assert math.isclose(error.cosine, float(cosine), rel_tol=1e-6)
    assert math.isclose(error.max_abs_error, float(diff.abs().max()), rel_tol=1e-12)
    assert 19 < error.sqnr_db < 21  # noise at 1/10 the signal's std is 20 dB


def test_chunking_gives_the_same_figures(monkeypatch) -> None:
    import quantizers.metrics as metrics

    w = torch.randn(1000, 33)
    d = w + 0.01 * torch.randn(1000, 33)
    whole = weight_error(w, d)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 100)
    chunked = weight_error(w, d)
    assert math.isclose(whole.sqnr_db, chunked.sqnr_db, rel_tol=1e-6)
    assert whole.max_abs_error == chunked.max_abs_error


def test_zero_original_with_noise_has_minus_infinite_sqnr() -> None:
    error = weight_error(torch.zeros(4, 4), torch.ones(4, 4))
    assert error.sqnr_db == -math.inf
    assert error.relative_error == math.inf


def test_kernel_error_equals_the_error_of_the_dequantized_weight() -> None:
    import pytest

    from quantizers import get_scheme, quantize, scheme_names

    weight = (torch.randn(96, 512, generator=torch.Generator().manual_seed(9)) * 0.02).to(torch.bfloat16)
    weight[3] = 0.0
    for name in scheme_names():
        for compile in (False, True):
            result = quantize(weight, get_scheme(name), compile=compile)
            direct = weight_error(weight, result.dequantized)
            assert result.error.sqnr_db == pytest.approx(direct.sqnr_db, rel=1e-5), name
            assert result.error.relative_error == pytest.approx(direct.relative_error, rel=1e-5), name
            assert result.error.cosine == pytest.approx(direct.cosine, rel=1e-6), name
            assert result.error.max_abs_error == direct.max_abs_error, name
