from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from quantizers.packing import (
    fp4_codes,
    fp4_nibbles,
    fp4_values,
    pack_int,
    pack_int_along_rows,
    pack_nibbles,
    unpack_fp4,
    unpack_int,
    unpack_int_along_rows,
)


def test_int4_test_vector_from_the_format_notes() -> None:
    row = torch.tensor([[-8, -7, -1, 0, 1, 2, 6, 7]], dtype=torch.int8)
    packed = pack_int(row, 4)
    assert packed.dtype == torch.int32
    assert packed.shape == (1, 1)
    assert packed.view(torch.uint32).item() == 0xFEA98710


@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("columns", [8, 13, 64, 100, 129])
def test_int_packing_matches_compressed_tensors_and_round_trips(num_bits: int, columns: int) -> None:
    low, high = -(1 << (num_bits - 1)), 1 << (num_bits - 1)
    q = torch.randint(low, high, (7, columns), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    ours = pack_int(q, num_bits)
    assert torch.equal(ours, pack_to_int32(q, num_bits))
    assert torch.equal(unpack_int(ours, num_bits, columns), q)


def test_zero_points_pack_along_rows_like_compressed_tensors() -> None:
    zp = torch.randint(-8, 8, (20, 3), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    ours = pack_int_along_rows(zp, 4)
    assert torch.equal(ours, pack_to_int32(zp, 4, packed_dim=0))
    assert torch.equal(unpack_int_along_rows(ours, 4, 20), zp)


def test_fp4_nibbles_round_ties_and_pack_like_compressed_tensors() -> None:
    # Every tie point of the E2M1 grid, both signs, and values that round to (negative) zero.
    magnitudes = [0.0, 0.1, 0.25, 0.26, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0,
                  5.0, 5.01, 6.0]
    values = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32).reshape(2, -1)
    nibbles = fp4_nibbles(values)
    theirs_values = torch.tensor(
        [[_ct_round(v) for v in row] for row in values.tolist()], dtype=torch.float32
    )
    assert torch.equal(pack_nibbles(nibbles), pack_fp4_to_uint8(theirs_values))
    decoded = unpack_fp4(pack_nibbles(nibbles), torch.float32)
    assert torch.equal(decoded, theirs_values)


def _ct_round(v: float) -> float:
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    return float(FP4_E2M1_DATA.cast_to_fp4(torch.tensor([v])).item())


def _around(points: list[float], ulps: int) -> torch.Tensor:
    """Every float32 within `ulps` representable steps of each point, both sides."""
    out = []
    for point in points:
        for direction in (-1.0, 7.0):
            value = torch.tensor(point, dtype=torch.float32)
            for _ in range(ulps):
                value = torch.nextafter(value, torch.tensor(direction))
                out.append(value.item())
    return torch.tensor(points + out, dtype=torch.float32)


def test_fp4_rounding_matches_compressed_tensors_around_every_boundary() -> None:
    # The rounding is arithmetic (one round in units of the local step), not a comparison per
    # boundary: check it bit for bit where it could go wrong, the 64 floats either side of every
    # tie and grid point, and on a random spread, both signs.
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    points = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0]
    spread = torch.rand(200_000, generator=torch.Generator().manual_seed(5)) * 6
    magnitudes = torch.cat([_around(points, 64), spread]).clamp(0, 6)
    magnitudes = magnitudes[: magnitudes.numel() // 2 * 2]  # nibbles pack in pairs
    values = torch.cat([magnitudes, -magnitudes]).reshape(2, -1)
    theirs = FP4_E2M1_DATA.cast_to_fp4(values)
    codes, rounded = fp4_codes(values)
    assert torch.equal(rounded, theirs)
    assert torch.equal(torch.signbit(rounded), values < 0)  # negative zeros kept, as they pack
    assert torch.equal(pack_nibbles(codes.to(torch.uint8)), pack_fp4_to_uint8(theirs))
    assert torch.equal(fp4_values(values), rounded)
