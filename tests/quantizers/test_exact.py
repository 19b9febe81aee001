"""The device-independent scale arithmetic equals the float formulas it replaces, on the CPU.

The CPU's float32 division, log2 and exp2 are exact or correctly rounded where the kernels use
them, so the replacements (float64 quotients, exponent bits) must give the very same values
there; on GPUs, where those float ops are not, they are what keeps the bytes the CPU's.
Exhaustive over every finite bf16 value, and over random float32 values.
"""

from __future__ import annotations

import pytest
import torch

from quantizers.formats._common import (
    bf16_rounded_on_bits,
    exact_quotient,
    exponent_of_power_of_two,
    power_of_two,
    round_to_dtype,
)


def _every_bf16() -> torch.Tensor:
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("divisor", [7.5, 15.0, 127.5, 255.0, 448.0, 6.0, 3.0])
def test_exact_quotient_equals_float32_division(divisor: float) -> None:
    for values in (_every_bf16(), torch.randn(1 << 18, generator=torch.Generator().manual_seed(0))):
        expected = values / divisor
        assert torch.equal(exact_quotient(values, divisor).view(torch.int32), expected.view(torch.int32))
        tensor_divisor = torch.full_like(values, divisor)
        quotient = exact_quotient(values, tensor_divisor)
        assert torch.equal(quotient.view(torch.int32), expected.view(torch.int32))


def test_tensor_quotients_equal_float32_division() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(1 << 18, generator=generator)
    b = torch.randn(1 << 18, generator=generator).abs() * 1e-2
    assert torch.equal(exact_quotient(a, b).view(torch.int32), (a / b).view(torch.int32))


def test_power_of_two_equals_exp2() -> None:
    exponent = torch.arange(0, 256, dtype=torch.int32)
    assert torch.equal(power_of_two(exponent), torch.exp2(exponent.float() - 127))


def test_exponent_bits_equal_log2_of_powers_of_two() -> None:
    exponent = torch.arange(0, 255, dtype=torch.int32)  # 2^-127 .. 2^127
    powers = torch.exp2(exponent.float() - 127)
    assert torch.equal(exponent_of_power_of_two(powers), (torch.log2(powers).floor() + 127).to(torch.int32))
    # Zero and the bf16-rounded powers below float32's normal range: log2 gives < -126 there, and
    # the callers clamp; the bits give 0 or -1, which clamp to the same 0.
    tiny = torch.tensor([0.0, 2.0**-130, 2.0**-140, 2.0**-127])
    clamped = (torch.log2(tiny).floor() + 127 - 2).clamp(0, 255).to(torch.int32)
    assert torch.equal((exponent_of_power_of_two(tiny) - 2).clamp(0, 255), clamped)


def test_e4m3_conversions_equal_torchs_float8_conversion() -> None:
    # Compiled kernels convert on the bits, eager ones with torch's cast: the same bytes either
    # way. Every code, every midpoint between neighbours and the 32 floats either side of each,
    # every bf16 in range, and random values across the normal and subnormal ranges; both signs.
    from quantizers.formats.fp8_bits import (
        e4m3_values,
        e4m3_values_bits,
        from_e4m3,
        from_e4m3_bits,
        to_e4m3,
        to_e4m3_bits,
    )

    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    points = torch.cat([codes, (codes[1:] + codes[:-1]) / 2])
    near = [points]
    for direction in (-1.0, 500.0):
        value = points
        for _ in range(32):
            value = torch.nextafter(value, torch.full_like(value, direction))
            near.append(value)
    generator = torch.Generator().manual_seed(2)
    spread = [torch.rand(1 << 18, generator=generator) * 448,
              torch.rand(1 << 14, generator=generator) * 2**-6]
    magnitudes = torch.cat([*near, _every_bf16().abs(), *spread]).clamp(0, 448)
    values = torch.cat([magnitudes, -magnitudes])
    reference = values.to(torch.float8_e4m3fn)
    for convert in (to_e4m3, to_e4m3_bits):
        codes, held = convert(values)
        assert torch.equal(codes, reference.view(torch.uint8)), convert.__name__
        assert torch.equal(held.view(torch.int32), reference.float().view(torch.int32)), convert.__name__
    for values_of in (e4m3_values, e4m3_values_bits):  # signs of zero included: compare the bits
        assert torch.equal(values_of(values).view(torch.int32), reference.float().view(torch.int32))
    every_code = torch.cat([torch.arange(0, 127), torch.arange(128, 255)]).to(torch.uint8)  # no NaN
    for decode in (from_e4m3, from_e4m3_bits):
        assert torch.equal(decode(every_code), every_code.view(torch.float8_e4m3fn).float()), decode.__name__


def _float32_sample() -> torch.Tensor:
    """Finite float32 values: a stride through every bit pattern, every pattern whose upper half is
    0 (zero and the smallest subnormals), and each bf16 rounding midpoint with its two neighbours."""
    strided = torch.arange(-(1 << 31), (1 << 31) - 1, 9973, dtype=torch.int64).to(torch.int32)
    small = torch.arange(0, 1 << 16, dtype=torch.int32)
    midpoints = (torch.arange(0, 1 << 16, dtype=torch.int32) << 16) | 0x8000
    bits = torch.cat([strided, small, small | (1 << 31), midpoints, midpoints - 1, midpoints + 1])
    values = bits.view(torch.float32)
    return values[torch.isfinite(values)]


def test_bf16_rounding_on_the_bits_equals_the_cast() -> None:
    # CUDA kernels round on the bits, CPU kernels cast (round_to_dtype): the same bf16 values, or the
    # CPU's bytes and the GPU's would part. Overflow to inf included (midpoints above bf16's max).
    values = _float32_sample()
    cast = values.to(torch.bfloat16).float()
    assert torch.equal(bf16_rounded_on_bits(values).view(torch.int32), cast.view(torch.int32))
    assert torch.equal(round_to_dtype(values, torch.bfloat16).view(torch.int32), cast.view(torch.int32))


def test_compiled_bf16_rounding_keeps_the_cast() -> None:
    # Inductor would fold x.to(bf16).float() away without emulate_precision_casts.
    from quantizers.kernels import maybe_compiled

    def rounded(values: torch.Tensor) -> torch.Tensor:
        return round_to_dtype(values * 1.0, torch.bfloat16)

    values = _float32_sample()
    compiled = maybe_compiled(rounded, 0, True)(values)
    assert torch.equal(compiled.view(torch.int32), values.to(torch.bfloat16).float().view(torch.int32))
