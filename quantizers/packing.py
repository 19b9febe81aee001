"""Bit packing shared by the formats: int4/int8 into int32 words, FP4 (E2M1) nibbles into bytes.

Layouts (compressed-tensors): an int value of b bits is offset by 2^(b-1) to be unsigned, and
element i of a row occupies bits [i*b, i*b+b) of the row's bit stream, lowest bits first, 32 bits
per int32 word. For b in (4, 8) that stream is exactly the row's bytes in little-endian order, so
packing is a byte view (8 bits) or a nibble gather done with shifts on int64 words (4 bits).
FP4 puts two nibbles per byte, the even element in
the low nibble; a nibble is sign<<3 | magnitude index.
"""

from __future__ import annotations

import sys

import torch

from quantizers.kernels import maybe_compiled

__all__ = [
    "FP4_VALUES",
    "pack_codes",
    "unpack_codes",
    "pack_int",
    "unpack_int",
    "pack_int_along_rows",
    "unpack_int_along_rows",
    "fp4_codes",
    "fp4_values",
    "round_to_minifloat",
    "fp4_nibbles",
    "pack_nibbles",
    "unpack_nibbles",
    "unpack_fp4",
]

# E2M1 magnitudes by index 0..7.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("quantfleet's packing assumes a little-endian host")


def _view_rows(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret each row's bytes as `dtype` (rows stay rows).

    Goes through a flat copy-free view because `.contiguous()` keeps odd strides on size-1 dims,
    which `Tensor.view(dtype)` refuses.
    """
    rows = tensor.shape[0]
    return tensor.contiguous().reshape(-1).view(dtype).reshape(rows, -1)


def _words_from_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) uint8 codes in [0, 16), cols % 8 == 0 -> (rows, cols/8) int32 words.

    Eight bytes are read as one int64 and their low nibbles gathered into its low 32 bits by
    three shift-and-mask steps: a vectorisable bit trick instead of a strided gather.
    """
    x = _view_rows(codes, torch.int64) & 0x0F0F0F0F0F0F0F0F
    x = (x | (x >> 4)) & 0x00FF00FF00FF00FF
    x = (x | (x >> 8)) & 0x0000FFFF0000FFFF
    x = (x | (x >> 16)) & 0x00000000FFFFFFFF
    return x.to(torch.int32)


def _nibbles_from_words(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `_words_from_nibbles`: (rows, w) int32 -> (rows, 8w) uint8 codes."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = (x | (x << 16)) & 0x0000FFFF0000FFFF
    x = (x | (x << 8)) & 0x00FF00FF00FF00FF
    x = (x | (x << 4)) & 0x0F0F0F0F0F0F0F0F
    return _view_rows(x, torch.uint8)


def _bytes_to_words(stream: torch.Tensor) -> torch.Tensor:
    """(rows, n_bytes) uint8 -> (rows, ceil(n_bytes/4)) int32, zero-padding the last word."""
    if stream.shape[-1] % 4:
        stream = torch.nn.functional.pad(stream, (0, 4 - stream.shape[-1] % 4))
    return _view_rows(stream, torch.int32)


def pack_codes(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack unsigned codes (int value + 2^(b-1), uint8, (rows, cols)) into int32 words."""
    if num_bits == 8:
        return _bytes_to_words(codes)
    if num_bits != 4:
        raise ValueError(f"packing supports 4 and 8 bits, not {num_bits}")
    columns = codes.shape[-1]
    if columns % 8 == 0:
        return maybe_compiled(_words_from_nibbles, codes.numel())(codes)
    if columns % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return _bytes_to_words(pack_nibbles(codes))


def pack_int(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack int8 values in [-2^(b-1), 2^(b-1)) along the last dim into int32 words."""
    codes = (q.to(torch.int16) + (1 << (num_bits - 1))).to(torch.uint8)
    return pack_codes(codes, num_bits)


def unpack_codes(packed: torch.Tensor, num_bits: int, columns: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (rows, words) int32 -> (rows, columns) uint8 codes."""
    if num_bits == 8:
        return _view_rows(packed, torch.uint8)[:, :columns]
    return maybe_compiled(_nibbles_from_words, packed.numel() * 8)(packed)[:, :columns]


def unpack_int(packed: torch.Tensor, num_bits: int, columns: int) -> torch.Tensor:
    """Inverse of `pack_int`: (rows, words) int32 -> (rows, columns) int8."""
    codes = unpack_codes(packed, num_bits, columns).to(torch.int16)
    return (codes - (1 << (num_bits - 1))).to(torch.int8)


def pack_int_along_rows(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack along dim 0 (how asymmetric zero points are stored): (rows, cols) -> (words, cols)."""
    return pack_int(q.t(), num_bits).t().contiguous()


def unpack_int_along_rows(packed: torch.Tensor, num_bits: int, rows: int) -> torch.Tensor:
    return unpack_int(packed.t().contiguous(), num_bits, rows).t().contiguous()


def round_to_minifloat(
    magnitude: torch.Tensor, mantissa_bits: int, min_exponent: int, max_exponent: int
) -> torch.Tensor:
    """Non-negative float32 rounded to nearest (ties to even) in a small float format.

    The format keeps `mantissa_bits` bits after the point in each binade whose biased float32
    exponent lies in [min_exponent, max_exponent]; below, values are subnormals spaced as the
    lowest binade is. So rounding is one `round` in units of the local step, a power of two
    read from the float's exponent bits, and scaling by it (or its inverse, never a division)
    is exact on every device. Used instead of comparisons against each rounding boundary:
    eager `torch.where` is ~10x slower than arithmetic on the CPU, and the scale searches round
    every candidate eagerly.
    """
    exponent = (magnitude.view(torch.int32) >> 23).clamp(min_exponent, max_exponent) - mantissa_bits
    inverse = ((254 - exponent) << 23).view(torch.float32)
    return (magnitude * inverse).round().mul((exponent << 23).view(torch.float32))


def _fp4_magnitudes(y: torch.Tensor) -> torch.Tensor:
    """|y| (float32, at most 6) rounded to the nearest E2M1 magnitude, ties to the even mantissa:
    one mantissa bit, binades [1, 2) to [4, 8), so steps of 0.5 below 2, 1 below 4, 2 up to 6.
    Ties go as compressed-tensors' `cast_to_fp4` sends them (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4)."""
    return round_to_minifloat(y.abs(), mantissa_bits=1, min_exponent=127, max_exponent=129)


def fp4_values(y: torch.Tensor) -> torch.Tensor:
    """float32 values already clamped to [-6, 6], rounded to E2M1 values (see `fp4_codes`).

    The scale searches' grid: zeros may carry either sign (they only enter products and sums).
    """
    return _fp4_magnitudes(y).copysign(y)


def fp4_codes(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round float32 values already clamped to [-6, 6] to E2M1: (nibble as float, its value).

    Ties go to the even mantissa, as compressed-tensors rounds (`_fp4_magnitudes`). Negative
    values that round to zero keep their sign bit, as compressed-tensors packs -0.0. Everything
    stays in float32 until the caller's final cast: Inductor vectorises uint8 arithmetic poorly
    (10x slower).
    """
    magnitude = _fp4_magnitudes(y)
    # 0, .5, 1, 1.5 -> index 0..3 (2m); 2, 3, 4 -> 4..6 (m + 2); 6 -> 7 (m/2 + 4): the smallest of
    # the three lines is the right one at every magnitude, and min is arithmetic, not a where.
    index = torch.minimum(torch.minimum(magnitude * 2.0, magnitude + 2.0), magnitude * 0.5 + 4.0)
    negative = (y < 0).float()
    return index + negative * 8.0, magnitude * (1.0 - 2.0 * negative)


def fp4_nibbles(y: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles (uint8) of float32 values already clamped to [-6, 6] (see `fp4_codes`)."""
    return fp4_codes(y)[0].to(torch.uint8)


def _bytes_from_nibble_pairs(nibbles: torch.Tensor) -> torch.Tensor:
    # Two bytes read as one int16 (even element low): keep the low nibble of each.
    pair = _view_rows(nibbles, torch.int16)
    return ((pair & 0xF) | ((pair >> 4) & 0xF0)).to(torch.uint8)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(rows, cols) nibbles, cols even -> (rows, cols/2) bytes, the even column in the low nibble."""
    return maybe_compiled(_bytes_from_nibble_pairs, nibbles.numel())(nibbles)


def _nibbles_from_bytes(packed: torch.Tensor) -> torch.Tensor:
    # Each byte becomes an int16 holding its low nibble in the low byte, its high nibble above.
    wide = packed.to(torch.int16)
    return _view_rows((wide & 0xF) | ((wide & 0xF0) << 4), torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(rows, cols/2) bytes -> (rows, cols) nibbles, inverse of `pack_nibbles`."""
    return maybe_compiled(_nibbles_from_bytes, packed.numel() * 2)(packed.contiguous())


def unpack_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(rows, cols/2) bytes -> (rows, cols) E2M1 values in `dtype`."""
    nibbles = unpack_nibbles(packed)
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    magnitude = table[(nibbles & 0x7).long()]
    return torch.where((nibbles & 0x8) != 0, -magnitude, magnitude).to(dtype)
