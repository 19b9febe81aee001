"""A trillion parameters, by simulation honest about its assumptions: plan the whole Kimi-K2-shaped
model, convert a stratified sample of its work units on a local multi-node Ray cluster, and
project the whole conversion on 8/16/64 GPU nodes from the measured per-unit costs.

    .venv/bin/python benchmarks/scale.py [--fraction 0.01] [--nodes 2] [--kill-node] [--record]

The source is `synthetic://kimi-k2-bf16` (infra/storage/synthetic.py): the published Kimi-K2
layout in bf16, bytes made up on read. The block-FP8 original (`synthetic://kimi-k2`) is planned
too, to show it is refused until FP8 sources are supported. Steps:

1. plan the whole model (time, peak RSS of this driver process; targets < 60 s, < 4 GB);
2. start a local cluster (a zero-CPU head and one-CPU worker nodes, as tests/flows/test_faults.py
   does), convert a small set of routed-expert units on 1 node, then on N nodes (speed-up; the
   two runs must give the same bytes);
3. measure the scheduling overhead per unit with units that hold one norm tensor each;
4. convert the stratified sample (attention, dense MLP, routed experts, shared experts,
   embeddings/head; >= --fraction of the bytes of each stratum, at least one unit each), publish
   it to a local folder and run `verify` on it (the manifest must cover exactly the sample);
5. with --kill-node, convert the speed-up units again and remove one worker node as soon as the
   first unit is done: every unit must still finish, byte-identical to the undisturbed run;
6. project: per unit on a GPU worker = scheduling overhead + host work (measured here: reading
   excluded, since the synthetic source makes its bytes with the CPU) + quantized bytes at the
   H200 kernel rate; per node, G GPU workers and a storage link of 2/10/25 GB/s carrying the
   bytes read and written. The larger of compute and storage time, plus the longest unit, is the
   wall time; the larger one is named the bottleneck.

`--record` writes the figures to docs/benchmarks.md ("Scale") and docs/scale-figures.json; every
run prints how far its projections are from the recorded ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks._doc import machine_line, peak_rss_bytes, rss_bytes, update_section  # noqa: E402
from flows.pipeline import SourceError, plan_conversion  # noqa: E402
from flows.plan import Plan  # noqa: E402
from flows.recipe import Recipe  # noqa: E402
from workers.records import UnitContext, UnitResult  # noqa: E402
from workers.units import TensorJob, WorkUnit  # noqa: E402

SOURCE = "synthetic://kimi-k2-bf16"
FIGURES = ROOT / "docs" / "scale-figures.json"
STRATA = ("attention", "dense MLP", "routed experts", "shared experts", "embeddings/head")
GIB = 2**30
# GPU kernel rates on one H200 (docs/reference landscape.md, benchmarks/gpu_check.py): bytes of bf16 in per s.
KERNEL_RATE = {"W4A16": 19 * GIB, "FP8": 100 * GIB}
# One W4A16 unit (3.74 GiB in) run warm on an H200 node without Ray: 0.89 GiB/s per worker, kernels,
# hashing, fsync and host<->device copies included (landscape.md).
H200_UNIT_RATE = 0.89 * GIB
NODE_COUNTS = (8, 16, 64)
STORAGE_GBPS = (2, 10, 25)


def stratum(name: str) -> str:
    if name.startswith(("model.embed_tokens", "lm_head", "model.norm")):
        return "embeddings/head"
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.gate_proj" in name or ".mlp.up_proj" in name or ".mlp.down_proj" in name:
        return "dense MLP"
    return "attention"  # attention projections, their norms, and the MoE router


def unit_stratum(unit: WorkUnit) -> str:
    weight: dict[str, int] = {}
    for job in unit.jobs:
        key = stratum(job.name)
        weight[key] = weight.get(key, 0) + job.end - job.begin
    return max(weight, key=lambda k: weight[k])


def unit_strata(unit: WorkUnit) -> set[str]:
    """Every stratum holding at least a tenth of the unit's bytes (a layer's shared experts sit
    beside its attention in the file, so they share units with it)."""
    weight: dict[str, int] = {}
    for job in unit.jobs:
        key = stratum(job.name)
        weight[key] = weight.get(key, 0) + job.end - job.begin
    return {k for k, v in weight.items() if v >= unit.bytes_in / 10}


def stratified_sample(plan: Plan, fraction: float) -> list[WorkUnit]:
    """At least `fraction` of each stratum's units' bytes (one unit at least), spread evenly over
    the model."""
    by_stratum: dict[str, list[WorkUnit]] = {s: [] for s in STRATA}
    for unit in plan.units:
        for name in unit_strata(unit):
            by_stratum[name].append(unit)
    chosen: list[WorkUnit] = []
    for units in by_stratum.values():
        if not units:
            continue
        want = fraction * sum(u.bytes_in for u in units)
        count = max(1, math.ceil(fraction * len(units)))
        while True:
            picks = [units[min(len(units) - 1, int((j + 0.5) * len(units) / count))] for j in range(count)]
            if sum(u.bytes_in for u in picks) >= want or count == len(units):
                break
            count += 1
        chosen += picks
    return sorted({u.index: u for u in chosen}.values(), key=lambda u: u.index)


# --- the cluster ---------------------------------------------------------------------------------


class LocalCluster:
    """A zero-CPU head and one-CPU worker nodes (separate raylets) on this machine."""

    def __init__(self, nodes: int) -> None:
        import ray
        from ray.cluster_utils import Cluster

        ray.shutdown()
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        self.workers = []
        for _ in range(nodes):
            self.add_node()
        ray.init(address=self.cluster.address, logging_level="ERROR", log_to_driver=False)

    def add_node(self) -> None:
        # The memory resource is bookkeeping for Ray's scheduler: the embeddings unit reserves
        # 4x its 2.35 GB tensor (the planner's estimate); it really uses about one copy.
        self.workers.append(self.cluster.add_node(num_cpus=1, memory=12 * GIB))
        self.cluster.wait_for_nodes()

    def remove_node(self, sparing: str | None = None) -> str:
        """Kill a worker node's raylet (not gracefully), not the node `sparing`; its id."""
        victim = next((w for w in self.workers if w.node_id != sparing), self.workers[-1])
        self.workers.remove(victim)
        self.cluster.remove_node(victim, allow_graceful=False)
        return str(victim.node_id)

    def info(self):  # noqa: ANN201 - flows.execute.ClusterInfo
        from flows.execute import start_ray

        return start_ray(self.cluster.address)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def context(plan: Plan, staging: Path | str) -> UnitContext:
    return UnitContext(
        plan_id=plan.plan_id, source_uri=plan.source_uri, staging_uri=str(staging),
        schemes=plan.schemes, min_sqnr_db=tuple(plan.recipe.gates.min_sqnr_for(s) for s in plan.schemes),
        min_cosine=plan.recipe.gates.min_cosine, probes=plan.recipe.probes, device="cpu",
    )


def run(
    cluster: LocalCluster, units: Sequence[WorkUnit], ctx: UnitContext,
    on_done: Callable[[WorkUnit, UnitResult], None] | None = None,
) -> tuple[float, list[UnitResult]]:
    from flows.execute import run_units

    started = time.perf_counter()
    results = run_units(units, ctx, cluster=cluster.info(), on_done=on_done)
    return time.perf_counter() - started, results


def _convert_measured(unit: WorkUnit, ctx: UnitContext) -> tuple[UnitResult, float]:
    """convert_unit in a Ray task, with the CPU seconds its process spent on it (user + system,
    every thread): on a machine shared by other jobs, wall time measures the neighbours."""
    import resource

    import ray

    from workers.convert_unit import convert_unit

    before = resource.getrusage(resource.RUSAGE_SELF)
    result = convert_unit(unit, ctx)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return result.model_copy(update={"node": ray.get_runtime_context().get_node_id()}), cpu


def run_measured(units: Sequence[WorkUnit], ctx: UnitContext) -> tuple[float, list[UnitResult], list[float]]:
    """Every unit as one Ray task (as flows.execute submits them), with its CPU seconds."""
    import ray

    remote = ray.remote(max_retries=3)(_convert_measured)
    started = time.perf_counter()
    refs = [remote.options(num_cpus=1, memory=u.memory_bytes, name=f"convert {u.file_name}").remote(u, ctx)
            for u in units]
    pairs = ray.get(refs)
    return time.perf_counter() - started, [p[0] for p in pairs], [p[1] for p in pairs]


# --- measurements in this process ----------------------------------------------------------------


def generation_rate(plan: Plan, unit: WorkUnit) -> float:
    """Bytes/s at which this machine makes up synthetic source bytes (subtracted from unit times:
    a real source is read from storage, which the projection models separately)."""
    from infra.safetensors import TensorInfo, TensorReader
    from infra.storage import open_storage

    source = open_storage(plan.source_uri)
    started, total = time.process_time(), 0
    with TensorReader(source, max_concurrent_reads=1) as reader:
        for job in unit.jobs:
            reader.read(job.file, TensorInfo(job.name, job.dtype, job.shape, job.begin, job.end))
            total += job.end - job.begin
    return total / (time.process_time() - started)


def cpu_kernel_rates(plan: Plan, sample: Sequence[WorkUnit]) -> dict[tuple[int, ...], float]:
    """Bytes per CPU second of the quantizer (and its probe-error estimate), per weight shape."""
    import torch

    from quantizers import estimate_output_error, probe_vectors, quantize

    torch.set_num_threads(1)  # as a one-CPU Ray worker runs it
    rates: dict[tuple[int, ...], float] = {}
    for job in (j for u in sample for j in u.jobs if j.scheme is not None):
        if job.shape in rates:
            continue
        weight = (torch.randn(job.shape) * 0.02).to(torch.bfloat16)
        scheme = plan.schemes[job.scheme]
        quantize(weight, scheme)  # warm-up (first-call compile)
        started = time.process_time()
        result = quantize(weight, scheme)
        if plan.recipe.probes:
            estimate_output_error(weight, result.scheme, probe_vectors(weight.shape[1], plan.recipe.probes))
        rates[job.shape] = (job.end - job.begin) / (time.process_time() - started)
    return rates


def tiny_units(plan: Plan, count: int) -> list[WorkUnit]:
    """Units of one norm tensor each: what a unit costs when it holds almost nothing."""
    norms: list[TensorJob] = [j for u in plan.units for j in u.jobs if len(j.shape) == 1][:count]
    return [
        WorkUnit.model_construct(index=i, file_name=f"tiny-{i:05d}.safetensors", jobs=(job,),
                                 bytes_in=job.end - job.begin, bytes_out=job.end - job.begin,
                                 memory_bytes=512 << 20)
        for i, job in enumerate(norms)
    ]


# --- projection ----------------------------------------------------------------------------------


def project(
    plan: Plan, per_stratum_host: dict[str, float], overhead_s: float, gpus_per_node: int,
    kernel_rate: float | None, longest_s: float,
) -> list[dict[str, object]]:
    """Whole-model wall time on N GPU nodes for each storage bandwidth, with the bottleneck.

    `kernel_rate` None: the host rates already include the quantize kernels."""
    host_s = kernel_s = 0.0
    for unit in plan.units:
        host_s += unit.bytes_in / per_stratum_host[unit_stratum(unit)]
        if kernel_rate:
            kernel_s += sum(j.end - j.begin for j in unit.jobs if j.scheme is not None) / kernel_rate
    sched_s = overhead_s * len(plan.units)
    moved = plan.bytes_in + plan.bytes_out
    rows = []
    for nodes in NODE_COUNTS:
        workers = nodes * gpus_per_node
        parts = {"host pipeline": host_s / workers, "GPU kernels": kernel_s / workers,
                 "scheduling": sched_s / workers}
        compute = sum(parts.values())
        for gbps in STORAGE_GBPS:
            storage = moved / (nodes * gbps * 1e9)
            if storage >= compute:
                bottleneck = f"storage ({gbps} GB/s per node)"
            else:
                bottleneck = max(parts, key=lambda k: parts[k])
            rows.append({"nodes": nodes, "gpus": workers, "storage_gbps": gbps,
                         "compute_s": compute, "storage_s": storage,
                         "wall_s": max(compute, storage) + longest_s, "bottleneck": bottleneck,
                         **{f"{k}_s": v for k, v in parts.items()}})
    return rows


# --- the benchmark -------------------------------------------------------------------------------


def _hms(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _kill_after_first(cluster: LocalCluster, killed: list[str]) -> Callable[[WorkUnit, UnitResult], None]:
    lock = threading.Lock()

    def on_done(unit: WorkUnit, result: UnitResult) -> None:
        with lock:
            if not killed:
                # Another node than the one that just finished: it is running the next unit, so
                # that unit dies with its raylet and must be retried on a surviving node.
                killed.append(cluster.remove_node(sparing=result.node))

    return on_done


def main() -> int:  # noqa: PLR0915 - one linear script, read top to bottom
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.01,
                        help="share of each stratum's bytes to convert (default 0.01, i.e. 1%%)")
    parser.add_argument("--nodes", type=int, default=2, help="local worker nodes, one CPU each (default 2)")
    parser.add_argument("--shard-size", type=int, default=64_000_000,
                        help="output bytes per unit (default 64 MB: ~250 MB of bf16 experts in)")
    parser.add_argument("--speedup-units", type=int, default=4,
                        help="routed-expert units converted on 1 node, then on N (default 4)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of a projected node (default 8)")
    parser.add_argument("--kill-node", action="store_true",
                        help="also remove a worker node mid-run and check nothing is lost")
    parser.add_argument("--workdir", default=None, help="where outputs go (default: a temp dir, deleted)")
    parser.add_argument("--record", action="store_true",
                        help="write the figures to docs/benchmarks.md and docs/scale-figures.json")
    args = parser.parse_args()
    load = os.getloadavg()
    recipe = Recipe.preset("W4A16")

    # 1. Plan the whole model in this (driver) process.
    baseline = rss_bytes()
    started, cpu_started = time.perf_counter(), time.process_time()
    plan = plan_conversion(SOURCE, recipe, shard_size=args.shard_size)
    plan_s, plan_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    plan_peak = peak_rss_bytes()
    params = sum(math.prod(j.shape) for j in plan.jobs())
    try:
        plan_conversion("synthetic://kimi-k2", recipe, shard_size=args.shard_size)
        fp8_line = "block-FP8 original: planned (FP8 sources are supported on this branch)"
    except SourceError as error:
        fp8_line = f"block-FP8 original: refused ({str(error).split(': ', 1)[1].split(';')[0]})"
    lines = [
        f"load average at start {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} CPUs (shared machine)",
        f"plan: {SOURCE}, {params / 1e12:.3f}T parameters, {plan.bytes_in / 1e12:.2f} TB bf16 in, "
        f"{sum(len(u.jobs) for u in plan.units):,} tensors -> {len(plan.units):,} units "
        f"(W4A16, {args.shard_size / 1e6:.0f} MB shards, {plan.bytes_out / 1e12:.2f} TB out) in "
        f"{plan_s:.1f} s ({plan_cpu:.1f} CPU s); driver peak RSS {plan_peak / GIB:.2f} GiB "
        f"(process at start {baseline / GIB:.2f} GiB); targets < 60 s and < 4 GB: "
        f"{'met' if plan_s < 60 and plan_peak < 4e9 else '**missed**'}",
        fp8_line,
    ]
    print("\n".join(lines), flush=True)

    sample = stratified_sample(plan, args.fraction)
    strata = {s: [u for u in sample if unit_stratum(u) == s] for s in STRATA}
    covered_strata = {s: sum(1 for u in sample if s in unit_strata(u)) for s in STRATA}
    sample_bytes = sum(u.bytes_in for u in sample)
    lines.append(
        f"sample: {len(sample)} units, {sample_bytes / 1e9:.1f} GB in = {sample_bytes / plan.bytes_in:.2%} "
        "of the bytes; units holding " + ", ".join(f"{s} {n}" for s, n in covered_strata.items())
    )
    print(lines[-1], flush=True)
    experts = [u for u in plan.units if unit_stratum(u) == "routed experts"]
    speedup_units = experts[len(experts) // 2 : len(experts) // 2 + args.speedup_units]
    gen_rate = generation_rate(plan, speedup_units[0])
    cpu_rates = cpu_kernel_rates(plan, sample)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qf-scale-"))
    cluster = LocalCluster(1)
    try:
        # 2. Speed-up from 1 to N nodes on the same units (and the same bytes). Each run is
        # preceded by one-tensor units, so every node has a worker process up (imports done).
        tiny = tiny_units(plan, 8 * args.nodes)
        run(cluster, tiny, context(plan, workdir / "warm-1"))
        one_s, one = run(cluster, speedup_units, context(plan, workdir / "one"))
        for _ in range(args.nodes - 1):
            cluster.add_node()
        run(cluster, tiny, context(plan, workdir / "warm-n"))
        many_s, many = run(cluster, speedup_units, context(plan, workdir / "many"))
        same = [r.sha256 for r in one] == [r.sha256 for r in many]
        lines.append(
            f"speed-up: {len(speedup_units)} routed-expert units "
            f"({sum(u.bytes_in for u in speedup_units) / 1e9:.2f} GB) take {one_s:.1f} s on 1 node, "
            f"{many_s:.1f} s on {args.nodes} nodes: x{one_s / many_s:.2f} "
            f"(ideal x{min(args.nodes, len(speedup_units))}); identical bytes: {same}"
        )
        print(lines[-1], flush=True)

        # 3. Scheduling overhead: units of one norm tensor each, on warm nodes.
        tiny_s, tiny_results = run(cluster, tiny, context(plan, workdir / "tiny"))
        overhead = max(0.0, (tiny_s * args.nodes - sum(r.seconds for r in tiny_results)) / len(tiny))
        lines.append(
            f"scheduling: {len(tiny)} one-tensor units in {tiny_s:.2f} s on {args.nodes} nodes: "
            f"{overhead * 1000:.0f} ms per unit outside the task (dispatch, result, record)"
        )
        print(lines[-1], flush=True)

        # 4. The stratified sample, published and verified.
        from flows.pipeline import finalize_and_publish
        from flows.versions import verify_uri

        dest = workdir / "published"
        sub_plan = plan.model_copy(update={"units": tuple(sample)})
        from infra.storage import open_storage

        staging = open_storage(dest).uri(plan.publisher(open_storage(dest)).staging)
        sample_s, results, cpu_seconds = run_measured(sample, context(plan, staging))
        finalize_and_publish(sub_plan, str(dest), results)
        manifest = json.loads((dest / "quantfleet.json").read_text())
        covered = sorted(s["file"] for s in manifest["shards"]) == sorted(u.file_name for u in sample)
        verified = all(r.ok for r in verify_uri(str(dest)))
        lines.append(
            f"sampled run: {sample_s:.1f} s on {args.nodes} nodes "
            f"({sample_bytes / sample_s / 1e6:.0f} MB/s); "
            f"published; manifest covers exactly the sampled units: {covered}; verify passes: {verified}"
        )
        print(lines[-1], flush=True)

        # Per-unit costs, per stratum: what a worker spends besides making up source bytes.
        table = ["| stratum | units (whole model) | sampled | MB in per unit | wall s per unit "
                 "| CPU s per unit | MB per CPU s | host MB per CPU s (no source, no kernel) |",
                 "|---|---|---|---|---|---|---|---|"]
        host_rate: dict[str, float] = {}
        by_index = {r.index: r for r in results}
        cpu_of = {r.index: c for r, c in zip(results, cpu_seconds, strict=True)}
        for unit in sample:
            r = by_index[unit.index]
            print(f"  unit {unit.index:5d} {unit_stratum(unit):16s} {unit.bytes_in / 1e6:7.0f} MB "
                  f"{r.seconds:6.1f} s wall {cpu_of[unit.index]:6.1f} s CPU on {r.node[:8]}", flush=True)
        for name, units in strata.items():
            if not units:
                continue
            total_in = sum(u.bytes_in for u in units)
            wall = sum(by_index[u.index].seconds for u in units)
            seconds = sum(cpu_of[u.index] for u in units)
            kernel = sum((j.end - j.begin) / cpu_rates[j.shape] for u in units for j in u.jobs
                         if j.scheme is not None)
            host = max(seconds - total_in / gen_rate - kernel, 0.05 * seconds)
            host_rate[name] = total_in / host
            whole = sum(1 for u in plan.units if unit_stratum(u) == name)
            table.append(f"| {name} | {whole:,} | {len(units)} | {total_in / len(units) / 1e6:.0f} | "
                         f"{wall / len(units):.1f} | {seconds / len(units):.1f} | "
                         f"{total_in / seconds / 1e6:.0f} | "
                         f"{host_rate[name] / 1e6:.0f} |")
        for name in STRATA:
            host_rate.setdefault(name, min(host_rate.values()))
        print("\n".join(table), flush=True)
        rates = ", ".join(f"{'x'.join(map(str, k))} {v / 1e6:.0f} MB" for k, v in cpu_rates.items())
        lines.append(f"synthetic source bytes made up at {gen_rate / 1e6:.0f} MB per CPU second "
                     "(subtracted); "
                     f"CPU quantizer with probes, per CPU second and shape: {rates}")
        print(lines[-1], flush=True)

        # 5. Kill a node mid-run: nothing is lost, bytes identical.
        if args.kill_node:
            if args.nodes < 2:
                raise SystemExit("--kill-node needs --nodes 2 or more")
            nodes_used: set[str] = set()
            killed_ids: list[str] = []
            kill = _kill_after_first(cluster, killed_ids)

            def on_done(unit: WorkUnit, result: UnitResult) -> None:
                nodes_used.add(result.node)
                kill(unit, result)

            killed_s, killed = run(cluster, speedup_units, context(plan, workdir / "killed"), on_done)
            same_after_kill = [r.sha256 for r in killed] == [r.sha256 for r in one]
            lines.append(
                f"node killed after the first unit finished: all {len(killed)} units finished in "
                f"{killed_s:.1f} s, none on the killed node: {not set(killed_ids) & nodes_used}; "
                f"byte-identical to the undisturbed run: {same_after_kill}"
            )
            print(lines[-1], flush=True)
            if not same_after_kill:
                return 1
    finally:
        cluster.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    # 6. Projection.
    longest = max(plan.units, key=lambda u: u.bytes_in)
    longest_s = longest.bytes_in / host_rate[unit_stratum(longest)] + overhead
    measured = project(plan, host_rate, overhead, args.gpus_per_node, KERNEL_RATE["W4A16"], longest_s)
    h200 = {name: H200_UNIT_RATE for name in STRATA}
    landscape = project(plan, h200, overhead, args.gpus_per_node, None,
                        longest.bytes_in / H200_UNIT_RATE + overhead)
    projection = ["| GPU nodes (GPUs) | storage per node | host measured here + H200 kernels | bottleneck "
                  "| H200 node's measured unit rate | bottleneck |", "|---|---|---|---|---|---|"]
    for row, other in zip(measured, landscape, strict=True):
        projection.append(
            f"| {row['nodes']} ({row['gpus']}) | {row['storage_gbps']} GB/s | **{_hms(row['wall_s'])}** "
            f"| {row['bottleneck']} | **{_hms(other['wall_s'])}** | {other['bottleneck']} |")
    print("\n".join(projection), flush=True)
    figures = {f"{r['nodes']}x{r['storage_gbps']}": r["wall_s"] for r in measured}
    if FIGURES.exists():
        recorded = json.loads(FIGURES.read_text())["wall_s"]
        drift = max(abs(figures[k] / recorded[k] - 1) for k in figures if k in recorded)
        print(f"largest difference from the recorded projection: {drift:.0%} (target: within 20%)")
    ok = plan_s < 60 and plan_peak < 4e9 and same and covered and verified
    if args.record:
        FIGURES.write_text(json.dumps({"wall_s": figures, "overhead_s": overhead, "host_rate": host_rate,
                                       "gen_rate": gen_rate}, indent=2, sort_keys=True) + "\n")
        command = " ".join(["benchmarks/scale.py", *sys.argv[1:]])
        update_section(
            "Scale",
            f"Measured with `.venv/bin/python {command}` ({machine_line()}); method and "
            "assumptions in docs/scale.md.\n\n" + "\n\n".join(f"- {line}" for line in lines)
            + "\n\n" + "\n".join(table) + f"\n\nProjected whole-model W4A16 conversion ({args.gpus_per_node} "
            "H200 per node, one worker each; left: this machine's measured host work per CPU second plus the "
            "W4A16 kernel at 19 GiB/s per GPU; right: the whole-unit rate measured on an H200 node, "
            "0.89 GiB/s per worker):\n\n" + "\n".join(projection),
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
