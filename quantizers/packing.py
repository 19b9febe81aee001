"""Bit packing shared by the formats: int4/int8 into int32 words, FP4 (E2M1) nibbles into bytes.

Layouts (compressed-tensors): an int value of b bits is offset by 2^(b-1) to be unsigned, and
element i of a row occupies bits [i*b, i*b+b) of the row's bit stream, lowest bits first, 32 bits
per int32 word. For b in (4, 8) that stream is exactly the row's bytes in little-endian order, so
packing is a byte view rather than a gather. FP4 puts two nibbles per byte, the even element in
the low nibble; a nibble is sign<<3 | magnitude index.
"""

from __future__ import annotations

import sys

import torch

__all__ = [
    "FP4_VALUES",
    "pack_int",
    "unpack_int",
    "pack_int_along_rows",
    "unpack_int_along_rows",
    "fp4_nibbles",
    "pack_nibbles",
    "unpack_fp4",
]

# E2M1 magnitudes by index 0..7.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("quantfleet's packing assumes a little-endian host")


def _offset_bytes(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """int8 values (rows, cols) -> their unsigned bit stream as bytes (rows, ceil(cols*b/8))."""
    unsigned = (q.to(torch.int16) + (1 << (num_bits - 1))).to(torch.uint8)
    if num_bits == 8:
        return unsigned
    if q.shape[-1] % 2:
        unsigned = torch.nn.functional.pad(unsigned, (0, 1))
    # (rows, cols) -> (rows, cols/2, 2): two 4-bit values per byte, the even one low.
    pairs = unsigned.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _bytes_to_words(stream: torch.Tensor) -> torch.Tensor:
    """(rows, n_bytes) uint8 -> (rows, ceil(n_bytes/4)) int32, zero-padding the last word."""
    if stream.shape[-1] % 4:
        stream = torch.nn.functional.pad(stream, (0, 4 - stream.shape[-1] % 4))
    return stream.contiguous().view(torch.int32)


def pack_int(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack int8 values in [-2^(b-1), 2^(b-1)) along the last dim into int32 words."""
    if num_bits not in (4, 8):
        raise ValueError(f"packing supports 4 and 8 bits, not {num_bits}")
    return _bytes_to_words(_offset_bytes(q, num_bits))


def unpack_int(packed: torch.Tensor, num_bits: int, columns: int) -> torch.Tensor:
    """Inverse of `pack_int`: (rows, words) int32 -> (rows, columns) int8."""
    stream = packed.contiguous().view(torch.uint8)
    if num_bits == 8:
        values = stream[:, :columns].to(torch.int16)
    else:
        # (rows, bytes) -> (rows, bytes, 2) nibbles, low first.
        values = torch.stack((stream & 0xF, stream >> 4), dim=-1).flatten(-2)[:, :columns]
        values = values.to(torch.int16)
    return (values - (1 << (num_bits - 1))).to(torch.int8)


def pack_int_along_rows(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack along dim 0 (how asymmetric zero points are stored): (rows, cols) -> (words, cols)."""
    return pack_int(q.t(), num_bits).t().contiguous()


def unpack_int_along_rows(packed: torch.Tensor, num_bits: int, rows: int) -> torch.Tensor:
    return unpack_int(packed.t().contiguous(), num_bits, rows).t().contiguous()


def fp4_nibbles(y: torch.Tensor) -> torch.Tensor:
    """Round values already clamped to [-6, 6] to E2M1 and return their nibbles (uint8).

    Ties go the way compressed-tensors' `cast_to_fp4` sends them (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), i.e. to the even mantissa. Negative values that round
    to zero keep their sign bit, as compressed-tensors packs -0.0.
    """
    a = y.abs()
    index = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75).to(torch.uint8)
        + (a > 1.25).to(torch.uint8)
        + (a >= 1.75).to(torch.uint8)
        + (a > 2.5).to(torch.uint8)
        + (a >= 3.5).to(torch.uint8)
        + (a > 5.0).to(torch.uint8)
    )
    return index | ((y < 0).to(torch.uint8) << 3)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(rows, cols) nibbles -> (rows, cols/2) bytes, the even column in the low nibble."""
    pairs = nibbles.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(rows, cols/2) bytes -> (rows, cols) E2M1 values in `dtype`."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    magnitude = table[(nibbles & 0x7).long()]
    return torch.where((nibbles & 0x8) != 0, -magnitude, magnitude).to(dtype)
