"""Rewrite a wheel without some of its folders, RECORD kept consistent.

    python scripts/gpu_node/slim_wheel.py WHEEL PREFIX [PREFIX ...]

Ray's cp312 wheel is ~79 MB, over what a lent GPU node's working tree may carry (64 MiB in all);
without its Java jar, the dashboard's web client and RLlib it is ~44 MB and runs everything
quantfleet asks of it (tasks, actors, resources; `include_dashboard=False`).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def slim(wheel: Path, prefixes: tuple[str, ...]) -> tuple[int, int]:
    """Drop every member under `prefixes` (and its RECORD line); returns (bytes before, after)."""
    before = wheel.stat().st_size
    temporary = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(prefixes)).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    temporary.replace(wheel)
    return before, wheel.stat().st_size


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    before, after = slim(Path(sys.argv[1]), tuple(sys.argv[2:]))
    print(f"{sys.argv[1]}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
