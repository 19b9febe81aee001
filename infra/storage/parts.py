"""Multipart part sizing for S3 streaming writes.

S3 limits: at most 10,000 parts; every part but the last at least 5 MiB; a part at most 5 GiB.
"""

from __future__ import annotations

__all__ = [
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "PartPlan",
    "plan_part_size",
]

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
# Without a size hint the part size doubles every this many parts, so an unknown size still fits
# in 10,000 parts (16 MiB parts reach ~5 TiB, the S3 object limit, well before part 10,000).
_GROWTH_EVERY = 1000


def plan_part_size(size_hint: int | None, min_part_size: int = 16 * MiB) -> int:
    """The part size for an object of about `size_hint` bytes.

    The smallest multiple of 1 MiB that is >= `min_part_size` (and >= 5 MiB) and splits
    `size_hint` into at most 10,000 parts; e.g. a 50 GB shard gets parts of 16 MiB (3,000 parts)
    and a 500 GB one parts of 48 MiB.
    """
    base = max(min_part_size, MIN_PART_SIZE)
    if size_hint is not None and size_hint > 0:
        needed = -(-size_hint // MAX_PARTS)  # ceil division
        needed = -(-needed // MiB) * MiB
        base = max(base, needed)
    if base > MAX_PART_SIZE:
        raise ValueError(f"an object of {size_hint} bytes exceeds what S3 multipart can store")
    return base


class PartPlan:
    """Part sizes for one upload: fixed when the size is known, growing when it is not."""

    def __init__(self, size_hint: int | None, min_part_size: int = 16 * MiB) -> None:
        self.base = plan_part_size(size_hint, min_part_size)
        self.grows = size_hint is None

    def size_of(self, part_number: int) -> int:
        """Size of part `part_number` (1-based)."""
        if part_number > MAX_PARTS:
            raise ValueError(
                f"more than {MAX_PARTS} parts needed: the size hint was too small; pass the "
                "expected object size as size_hint"
            )
        if not self.grows:
            return self.base
        return min(MAX_PART_SIZE, self.base << ((part_number - 1) // _GROWTH_EVERY))
