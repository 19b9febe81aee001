"""Copy a checkpoint into a folder slowly and in place, as `cp` or a slow link fills a watched folder.

    .venv/bin/python benchmarks/slow_copy.py SOURCE DEST [--chunk-mib 64] [--pause 0.25]

Each file is written where it will stay, chunk by chunk with a pause after each (64 MiB every
0.25 s: ~250 MB/s), JSON files first (the index before its shards), so a `quantfleet sync` run
meanwhile meets shards the index names but that are missing, then one still being written. Used
by hand for "A checkpoint caught mid-`cp` by a sync" in docs/benchmarks.md; it prints the time the
copy ended.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the checkpoint folder to copy")
    parser.add_argument("dest", type=Path, help="the folder to copy it into (made if missing)")
    parser.add_argument("--chunk-mib", type=int, default=64, help="MiB written between pauses")
    parser.add_argument("--pause", type=float, default=0.25, help="seconds to pause after each chunk")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    files = sorted((f for f in args.source.iterdir() if f.is_file()),
                   key=lambda f: (f.suffix != ".json", f.name))
    for file in files:
        with file.open("rb") as source, (args.dest / file.name).open("wb") as dest:
            while chunk := source.read(args.chunk_mib << 20):
                dest.write(chunk)
                dest.flush()
                time.sleep(args.pause)
    print(f"copy done at {time.strftime('%H:%M:%S')}", flush=True)


if __name__ == "__main__":
    main()
