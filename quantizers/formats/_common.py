"""Small helpers the format kernels share."""

from __future__ import annotations

import torch

ErrorPartials = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# A codes kernel's result: the codes, the error partial sums, the dequantized weight if asked for.
CodesResult = tuple[torch.Tensor, ErrorPartials, torch.Tensor | None]
# A format's `quantize`: stored tensors by suffix, group absmax, error partials, dequantized or None.
FormatResult = tuple[dict[str, torch.Tensor], torch.Tensor, ErrorPartials, torch.Tensor | None]

__all__ = [
    "group_view", "eps_of", "signed_absmax", "round_to_dtype", "bf16_rounded_on_bits",
    "error_partials", "ErrorPartials", "CodesResult", "FormatResult",
    "exact_quotient", "power_of_two", "exponent_of_power_of_two",
]


def group_view(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group_size); a channel strategy is one group per row."""
    columns = weight.shape[-1]
    size = columns if group_size is None else group_size
    return weight.unflatten(-1, (columns // size, size))


def eps_of(dtype: torch.dtype) -> float:
    """The value a zero scale becomes (compressed-tensors: FP8 0.125, ints 1, floats finfo.eps)."""
    if dtype == torch.float8_e4m3fn:
        return 0.125
    if dtype.is_floating_point:
        return torch.finfo(dtype).eps
    return 1.0


def signed_absmax(values: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    """max(|min(x, 0)|, max(x, 0)) over `dims`, kept, in the input dtype (exact: no rounding).

    Two reductions instead of `abs().amax()` so no copy of the weight is made. NaN propagates
    (amax/amin return NaN for a group holding one), which is how non-finite weights are caught.
    """
    low = values.amin(dim=dims, keepdim=True).clamp(max=0)
    high = values.amax(dim=dims, keepdim=True).clamp(min=0)
    return torch.maximum(-low, high)


def round_to_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `values` rounded to `dtype`'s precision, staying float32.

    Eager torch rounds every bf16/fp16 op's result to that dtype; the kernels compute in float32
    and call this where it would, so their results are bit-identical to compressed-tensors'.
    Compiled, `emulate_precision_casts` (quantizers.kernels) keeps Inductor from dropping the cast
    pair. On CUDA, bf16 is rounded on the bits instead (round to nearest even, as the cast does):
    that form was checked against the CPU's bytes at real sizes on an H200, and Triton reads a
    float's bits for free. On the CPU the cast is the faster form: torch's vectorised conversion
    does the same rounding in registers (NaN kept NaN), whereas Inductor's CPU code moves a float
    to its bits through a buffer, element by element: an int4 codes kernel took 1.7x as long.
    """
    if dtype == torch.float32:
        return values
    if dtype == torch.bfloat16 and values.is_cuda:
        return bf16_rounded_on_bits(values)
    return values.to(dtype).float()


def bf16_rounded_on_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 `values` rounded to bf16 (nearest even) by integer arithmetic on their bits."""
    bits = values.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.view(torch.float32)


def exact_quotient(numerator: torch.Tensor, denominator: torch.Tensor | float) -> torch.Tensor:
    """float32 `numerator / denominator` correctly rounded, the same on every device and compiler.

    Eager CUDA divides by a Python number as a multiply by its reciprocal, and Inductor rewrites
    division by a constant the same way on every device; in float32 that is off by one ulp now and
    then, which rounding to bf16 turns into a different stored scale (found on an H200 for
    8192x3072 W4A16_ASYM). Dividing in float64 instead and rounding once to float32 gives the
    correctly rounded float32 quotient whichever way the float64 division is done: operands are
    float32 (24-bit significands), so an exact quotient that is not itself a float32 rounding
    midpoint lies at least ~2^-49 (relative) away from one, far beyond float64's 2^-52 error.
    Only for per-group scales: it costs float64 arithmetic.
    """
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.double()
    return (numerator.double() / denominator).float()


def power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """float32 2^(e - 127) for integer tensors e in [0, 255], built from bits (exp2 is approximate
    on GPUs and flushes 2^-127, a subnormal, to zero): e << 23 is exactly that float for e >= 1
    (255 gives inf, like exp2(128)), and 2^-127 is the subnormal with bit 22 set."""
    exponent = exponent.to(torch.int32)
    bits = torch.where(exponent == 0, 1 << 22, exponent << 23)
    return bits.view(torch.float32)


def exponent_of_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) + 127 as int32, exactly, for float32 v: a power of two, zero, or non-finite.

    The biased exponent field, read from the bits (GPU log2 is approximate). Zero and subnormals
    give 0 or less; the callers clamp, as they clamped -inf and the tiny logs before.
    2^-127 (the only subnormal the MXFP4 scales produce) gives 0, as log2 does.
    """
    bits = values.view(torch.int32)
    biased = (bits >> 23) & 0xFF
    below_normal = torch.where((bits & 0x7FFFFF) == (1 << 22), 0, -1)
    return torch.where(biased == 0, below_normal, biased)


def error_partials(
    original: torch.Tensor, dequantized: torch.Tensor, dims: int | tuple[int, ...]
) -> ErrorPartials:
    """Partial sums for the error figures, reduced over `dims` (float32, small).

    sum x^2, sum d^2, sum x*d (d = x - x') and max |d|: from these `metrics.error_from_partials`
    gives SQNR, relative error and cosine. Computed inside the quantization kernels, where both
    operands are already in registers, so measuring the error costs almost nothing; returned as
    separate tensors because stacking them inside a compiled kernel splits its loops.
    """
    difference = original - dequantized
    return (
        (original * original).sum(dim=dims),
        (difference * difference).sum(dim=dims),
        (original * difference).sum(dim=dims),
        difference.abs().amax(dim=dims),
    )
