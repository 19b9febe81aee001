"""What a worker's warm-up leaves on a conversion: the same conversion run in a row in one Ray.

    .venv/bin/python benchmarks/warm_start.py SOURCE [--scheme W4A16] [--shard-size 400MB]
        [--runs 2] [--variants plan|both]

Starts a local Ray, plans SOURCE, sends the warm-up tasks as the CLI does (`warm_workers_for`)
and converts SOURCE `--runs` times into fresh folders with `flows.pipeline.run_conversion`
(no Prefect). The first run waits for the warm-up (imports, Dynamo tracing, loading the kernels
from the on-disk cache); later runs find the workers warm, so the difference is what warming
costs a conversion. Prints each worker's warm-up seconds, then each run's wall time and its units'
seconds. `--variants both` warms both variants of the codes kernel, as workers did before
`workers.warmup.kept_variants`, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from flows.cli import parse_size  # noqa: E402
from flows.execute import start_ray  # noqa: E402
from flows.pipeline import plan_conversion, run_conversion, warm_workers_for  # noqa: E402
from flows.recipe import Recipe  # noqa: E402
from workers.warmup import BOTH_VARIANTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--scheme", default="W4A16")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("400MB"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--variants", choices=("plan", "both"), default="plan")
    args = parser.parse_args()
    import ray

    recipe = Recipe(scheme=args.scheme)
    plan = plan_conversion(args.source, recipe, shard_size=args.shard_size)
    cluster = start_ray(None)
    both = (BOTH_VARIANTS,) * len(plan.schemes) if args.variants == "both" else None
    refs = warm_workers_for(plan, cluster, "auto", variants=both)
    print(f"{plan.bytes_in / 2**30:.2f} GiB in, {len(plan.units)} units, {args.variants} variants",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="qf-warm-") as work:
        for attempt in range(args.runs):
            dest = Path(work) / f"out-{attempt}"
            started = time.perf_counter()
            run_conversion(args.source, str(dest), recipe, shard_size=args.shard_size)
            seconds = time.perf_counter() - started
            units = [u["seconds"] for u in json.loads((dest / "quantfleet.json").read_text())["units"]]
            if attempt == 0:
                warmed = ", ".join(f"{s:.1f} s" for s in ray.get(refs))
                print(f"warm-up per worker: {warmed}")
            unit_seconds = ", ".join(f"{s:.2f}" for s in units)
            print(f"run {attempt + 1}: {seconds:.1f} s; units {unit_seconds}", flush=True)
            shutil.rmtree(dest)


if __name__ == "__main__":
    main()
