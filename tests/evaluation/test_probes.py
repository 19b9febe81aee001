"""The data-free probe output error: its definition, determinism, and the ordering of schemes."""

from __future__ import annotations

import math

import torch

from quantizers import get_scheme, output_error, probe_vectors, quantize, weight_error
from quantizers import probes as probes_module


def test_identical_weights_have_zero_output_error() -> None:
    w = torch.randn(64, 96)
    assert output_error(w, w.clone(), probe_vectors(96)) == 0.0


def test_output_error_matches_its_definition_and_is_chunked(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(300, 70, generator=generator, dtype=torch.float64)
    noisy = w + 0.05 * torch.randn(300, 70, generator=generator, dtype=torch.float64)
    x = probe_vectors(70, 16).double()
    expected = float((((w - noisy) @ x).norm()) / (w @ x).norm())
    whole = output_error(w.float(), noisy.float(), probe_vectors(70, 16))
    monkeypatch.setattr(probes_module, "_CPU_CHUNK_ELEMENTS", 70 * 7)  # 7 rows per chunk
    chunked = output_error(w.float(), noisy.float(), probe_vectors(70, 16))
    assert math.isclose(whole, expected, rel_tol=1e-5)
    assert math.isclose(chunked, whole, rel_tol=1e-6)


def test_probes_are_fixed_and_differ_per_width() -> None:
    a = probe_vectors(128, 16)
    assert a.shape == (128, 16) and a.dtype == torch.float32
    assert torch.equal(a, probe_vectors(128, 16))
    assert not torch.equal(probe_vectors(129, 16)[:128], a)


def test_isotropic_probes_estimate_the_relative_weight_error() -> None:
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(2)) * 0.02
    deq = quantize(w, get_scheme("W4A16"), name="w").dequantized
    rel = weight_error(w, deq).relative_error
    assert abs(output_error(w, deq, probe_vectors(512, 32)) / rel - 1) < 0.1


def test_eight_bits_beat_four_bits_on_the_same_layout() -> None:
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16) * 0.02
    x = probe_vectors(512)
    errors = {s: output_error(w, quantize(w, get_scheme(s), name="w").dequantized, x)
              for s in ("W8A16", "W4A16", "FP8", "NVFP4A16")}
    assert all(math.isfinite(e) and e > 0 for e in errors.values())
    assert errors["W8A16"] < errors["W4A16"] / 4
    assert errors["FP8"] < errors["NVFP4A16"]


def test_the_sampled_estimate_uses_exact_rows_of_the_full_result() -> None:
    from quantizers import get_scheme, quantize
    from quantizers.probes import estimate_output_error, output_error, probe_vectors, sampled_rows

    weight = (torch.randn(1500, 256, generator=torch.Generator().manual_seed(4)) * 0.02).to(torch.bfloat16)
    probes = probe_vectors(256, 8)
    for name in ("W4A16", "FP8_BLOCK", "NVFP4A16"):
        scheme = get_scheme(name)
        full = quantize(weight, scheme, compile=False)
        picks = sampled_rows(weight.shape[0], budget=512)
        assert sum(s.stop - s.start for s in picks) <= 512 and len(picks) == 4
        rows = torch.cat([full.dequantized[s] for s in picks])
        expected = output_error(torch.cat([weight[s] for s in picks]), rows, probes)
        assert estimate_output_error(weight, full.scheme, probes, budget=512) == expected, name
        # And it estimates the whole layer's figure closely.
        whole = output_error(weight, full.dequantized, probes)
        assert abs(expected - whole) / whole < 0.15, name


def test_a_whole_weight_sample_reuses_the_weights_own_quantization() -> None:
    # At most `budget` rows: the sample is the whole weight, and the conversion's own result gives
    # the same figure as quantizing again (which would double the cost of such tensors).
    from quantizers import get_scheme, quantize
    from quantizers.probes import estimate_output_error, probe_vectors

    weight = (torch.randn(384, 256, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    probes = probe_vectors(256, 8)
    for name, method in (("W4A16", "rtn"), ("FP8", "hqq"), ("NVFP4A16", "search")):
        full = quantize(weight, get_scheme(name), method=method)
        again = estimate_output_error(weight, full.scheme, probes, budget=512, method=method)
        assert estimate_output_error(weight, full.scheme, probes, budget=512, method=method,
                                     quantized=full) == again > 0, name
    # A weight with more rows than the budget is still sampled (its rows quantized apart).
    tall = torch.cat([weight, weight])
    full = quantize(tall, get_scheme("W4A16"))
    assert estimate_output_error(tall, full.scheme, probes, budget=256, quantized=full) == \
        estimate_output_error(tall, full.scheme, probes, budget=256)


def test_a_kept_dequantized_weight_is_sampled_instead_of_quantizing_again() -> None:
    # A tall weight whose quantization kept its dequantized weight: the sample's rows come from it,
    # and give exactly the figure of quantizing the sample again (rows quantize independently).
    from quantizers.probes import estimate_output_error, keeps_dequantized, sampled_rows

    weight = (torch.randn(1500, 256, generator=torch.Generator().manual_seed(6)) * 0.02).to(torch.bfloat16)
    probes = probe_vectors(256, 8)
    assert keeps_dequantized((1500, 256)) and keeps_dequantized((512, 1 << 16))
    assert not keeps_dequantized((8192, 4096))  # too large to copy: a sample is quantized again
    picks = sampled_rows(1500, budget=512)
    for name in ("W4A16_ASYM", "FP8_BLOCK", "NVFP4A16", "MXFP4A16"):
        kept = quantize(weight, get_scheme(name), keep_dequantized=True)
        rows = torch.cat([kept.dequantized[s] for s in picks])
        expected = output_error(torch.cat([weight[s] for s in picks]), rows, probes)
        sampled = estimate_output_error(weight, kept.scheme, probes, budget=512, quantized=kept)
        assert sampled == expected == estimate_output_error(weight, kept.scheme, probes, budget=512), name
