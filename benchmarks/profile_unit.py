"""Where one work unit's time goes: cProfile of `workers.convert_unit.convert_unit`, in one process.

    .venv/bin/python benchmarks/profile_unit.py SOURCE [--scheme W4A16|pass-through] [--method rtn]
        [--shard-size 2GB] [--unit 0] [--runs 2] [--no-profile]

Plans SOURCE (a local checkpoint, e.g. one `benchmarks/convert.py` generated), then converts its
first unit (or `--unit N`) `--runs` times into a fresh temporary staging folder each time, without
Ray; the last run (warm: compiled kernels, page cache) is profiled and its top functions by own
time printed.
The first run pays the compile and cold-cache costs, which a long-lived worker pays once.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.pipeline import plan_conversion, unit_context  # noqa: E402
from flows.recipe import Recipe  # noqa: E402
from infra.storage import open_storage  # noqa: E402
from workers.convert_unit import convert_unit  # noqa: E402

__all__ = ["main"]


def _size(text: str) -> int:
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3}
    for suffix, factor in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("--scheme", default="W4A16")
    parser.add_argument("--method", default="rtn", help="rtn, search or hqq (default: rtn)")
    parser.add_argument("--shard-size", default="2GB")
    parser.add_argument("--unit", type=int, default=0, help="which unit of the plan (default: the first)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-profile", action="store_true", help="time the runs only (no cProfile overhead)")
    args = parser.parse_args()
    if args.scheme == "pass-through":  # every tensor kept: only the data path is measured
        recipe = Recipe.model_validate({"scheme": "W4A16", "ignore": ["re:.*"]})
    else:
        recipe = Recipe.preset(args.scheme, method=args.method)
    plan = plan_conversion(str(args.source), recipe, shard_size=_size(args.shard_size))
    if not 0 <= args.unit < len(plan.units):
        parser.error(f"--unit {args.unit}: the plan has units 0 to {len(plan.units) - 1}")
    unit = plan.units[args.unit]
    print(f"unit {args.unit} of {len(plan.units)}: {len(unit.jobs)} tensors, "
          f"{unit.bytes_in / 2**30:.2f} GiB in, {unit.bytes_out / 2**30:.2f} GiB out", flush=True)
    stats = None
    for run in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="qf-profile-"))
        try:
            context = unit_context(plan, open_storage(work), args.device)
            profiler = cProfile.Profile() if run == args.runs - 1 and not args.no_profile else None
            started = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            result = convert_unit(unit, context)
            if profiler is not None:
                profiler.disable()
                stats = profiler
            seconds = time.perf_counter() - started
            print(f"run {run + 1}: {seconds:.2f} s ({unit.bytes_in / 2**30 / seconds:.2f} GiB/s) "
                  f"on {result.device}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if stats is None:
        return
    out = io.StringIO()
    pstats.Stats(stats, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
