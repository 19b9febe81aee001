"""End-to-end conversion of a generated 4-5 GB bf16 Llama-shaped checkpoint, side by side with
llm-compressor's `model_free_ptq` on the same input in the same run.

    .venv/bin/python benchmarks/convert.py [--workdir /tmp/qf-bench] [--layers 10] [--device cuda]
        [--kernel-cache ready|cold|both] [--methods rtn,search,hqq] [--no-prefect]
        [--mlp 14336 --shards 4] [--peer-python python3 --peer-path DIR]

Each tool runs as a user runs it, in its own process: `quantfleet convert` (Prefect local mode,
local Ray; on a GPU node units share the GPU) and `model_free_ptq` (llmcompressor 0.14, which needs
older transformers/compressed-tensors, so it runs from `benchmarks/.peer-venv`, created on first
use, or `--peer-python`/`--peer-path` where packages cannot be installed, as on a lent GPU node;
on `--device cuda` with 1 and with 4 workers on cuda:0). A pass-through row (a recipe that
keeps every tensor, so only the data path is measured) runs against plain `cp -r` of the same
files to the same disk. Figures per run: wall time, converting time, throughput (bf16 input /
converting time), the fixed start-up quantfleet reports separately (Prefect, Ray, planning), the
peak RSS of the largest process (sampled over the whole process tree, Ray workers included) and,
on CUDA, the GPU busy fraction (`nvidia-smi` utilisation sampled every 0.2 s during the run).
`--methods` adds a quantfleet row per data-free method (issue 12's GPU cost budget: `search` and
`hqq` at most 3x `rtn`'s converting time). `--layers 32 --mlp 14336 --shards 4` is the Llama-3-8B
shape of the GPU figures (13.5 GiB); with CUDA the random weights are drawn on the GPU (~20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._doc import machine_line, update_section  # noqa: E402

PEER = ROOT / "benchmarks" / ".peer-venv"
PEER_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1"]
MFP_SCHEMES = {"W4A16": "W4A16", "FP8": "FP8_DYNAMIC"}  # same weight layout as our FP8


_SHAPE_FILE = "generated-shape.json"  # the arguments `generate` drew the checkpoint with


def generate(path: Path, layers: int, mlp: int = 11008, shard_count: int = 3, experts: int = 0) -> int:
    """A Llama-shaped bf16 checkpoint (hidden 4096, MLP `mlp`) in `shard_count` shards; returns its
    bytes. With `experts`, a Qwen3-MoE-shaped one: each layer's MLP is that many routed experts of
    width `mlp` and a router. The weights are drawn on the GPU when there is one (an 8B shape takes
    minutes on CPUs). A checkpoint already at `path` is reused only if it was generated with the
    same shape (`_SHAPE_FILE`), so a run never measures another run's checkpoint under its own
    description; one of another shape is replaced."""
    shape = {"layers": layers, "mlp": mlp, "shards": shard_count, "experts": experts}
    marker = path / _SHAPE_FILE
    if (path / "model.safetensors.index.json").exists():
        if marker.exists() and json.loads(marker.read_text()) == shape:
            return sum(p.stat().st_size for p in path.glob("*.safetensors"))
        print(f"{path} holds a checkpoint of another shape: generating {shape}", flush=True)
        shutil.rmtree(path)
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    hidden, vocab, kv = 4096, 32000, 1024
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
        ]
        mlps = [f"{p}.mlp.experts.{e}" for e in range(experts)] if experts else [f"{p}.mlp"]
        names += [(f"{p}.mlp.gate.weight", (experts, hidden))] if experts else []
        for m in mlps:
            names += [(f"{m}.gate_proj.weight", (mlp, hidden)), (f"{m}.up_proj.weight", (mlp, hidden)),
                      (f"{m}.down_proj.weight", (hidden, mlp))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    total = sum(2 * torch.Size(s).numel() for _, s in names)
    per_shard = total // shard_count + 1
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in names:
        if size > per_shard:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += 2 * torch.Size(dims).numel()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            n: (torch.randn(s, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
            for n, s in shard
        }
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n, _ in shard})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    if experts:
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=128,
                      num_experts=experts, num_experts_per_tok=min(8, experts), moe_intermediate_size=mlp,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    (path / "config.json").write_text(json.dumps(config))
    marker.write_text(json.dumps(shape))  # last: a checkpoint cut off while drawn is drawn again
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _gpu_busy(stop: threading.Event, out: dict[str, list[float]]) -> None:
    """Sample the GPU's utilisation (percent of time a kernel ran) until `stop`."""
    samples = out.setdefault("gpu", [])
    while not stop.is_set():
        try:
            text = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout
            samples.append(float(text.split()[0]))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return
        time.sleep(0.2)


def _peak_tree_rss(process: subprocess.Popen[str], stop: threading.Event, out: dict[str, int]) -> None:
    """Sample RSS of the process and all its descendants; keep the largest single process."""
    try:
        root = psutil.Process(process.pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            if rss > out.get("peak", 0):
                out["peak"] = rss
                out["name"] = proc.name()
        time.sleep(0.1)


def measure(
    command: list[str], env: dict[str, str] | None = None, gpu: bool = False
) -> dict[str, object]:
    # Every run starts with nothing left to write back: a checkpoint generated just before (or the
    # previous run's output) would otherwise be flushed to disk during the next run, which then
    # competes with it for the disk (the first quantfleet row after a generate ran 32 s against 20 s).
    os.sync()
    stop, peak = threading.Event(), {}
    busy: dict[str, list[float]] = {}
    gpu_sampler = threading.Thread(target=_gpu_busy, args=(stop, busy)) if gpu else None
    if gpu_sampler is not None:
        gpu_sampler.start()
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    sampler = threading.Thread(target=_peak_tree_rss, args=(process, stop, peak))
    sampler.start()
    output, _ = process.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if gpu_sampler is not None:
        gpu_sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {
        "wall": wall,
        "peak": peak.get("peak", 0),
        "peak_process": peak.get("name", "?"),
        "output": output,
        "gpu_busy": (sum(busy["gpu"]) / len(busy["gpu"]) / 100) if busy.get("gpu") else None,
    }


def ensure_peer(python_override: str | None = None) -> Path:
    """The peer's interpreter: `python_override` as it is, else benchmarks/.peer-venv, made on first use."""
    if python_override:
        return Path(shutil.which(python_override) or python_override)
    python = PEER / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
        for package in PEER_PACKAGES:  # torch first, pinned, so pip takes the CPU build
            subprocess.run([str(python), "-m", "pip", "install", "-q", package], check=True)
    return python


PASS_THROUGH_RECIPE = "scheme: W4A16\nignore: ['re:.*']\nuse_default_ignore: true\n"


def run_quantfleet(
    source: Path, dest: Path, scheme: str, shard_size: str, device: str = "cpu", cold_kernels: bool = False,
    method: str = "rtn", prefect: bool = True,
) -> dict[str, object]:
    """`cold_kernels`: an empty kernel cache (a machine where setup.sh's compile-kernels never ran),
    else the kernels compiled beforehand, untimed, as setup.sh does. `prefect=False` runs
    `convert --no-prefect` (Ray only), for nodes without Prefect installed."""
    shutil.rmtree(dest, ignore_errors=True)
    if scheme == "pass-through":
        recipe = dest.parent / "pass-through.yaml"
        recipe.write_text(PASS_THROUGH_RECIPE)
        choice = ["--recipe", str(recipe)]
    else:
        choice = ["--scheme", scheme, "--method", method]
    quantfleet = ROOT / ".venv" / "bin" / "quantfleet"
    launcher = [str(quantfleet)] if quantfleet.exists() else [sys.executable, "-m", "flows.cli"]
    env = {"PREFECT_API_URL": "", "RAY_AUTH_MODE": "disabled"}  # empty: a temporary server
    target = "cuda" if device == "cuda" else "auto"
    if cold_kernels:
        cache = dest.parent / "cold-kernel-cache"
        shutil.rmtree(cache, ignore_errors=True)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    elif scheme != "pass-through":
        subprocess.run([*launcher, "compile-kernels", "--schemes", scheme, "--methods", method,
                        "--device", target], check=True, capture_output=True)
    result = measure(
        [*launcher, "convert", str(source), str(dest), *choice, "--shard-size", shard_size,
         "--device", target, *([] if prefect else ["--no-prefect"])],
        env=env,
        gpu=device == "cuda",
    )
    match = re.search(
        r"Time: ([0-9.]+) s in all: ([0-9.]+) s converting and publishing", str(result["output"])
    )
    assert match, result["output"]
    result["convert"] = float(match.group(2))
    result["startup"] = float(match.group(1)) - float(match.group(2))
    return result


def run_cp(source: Path, dest: Path) -> dict[str, object]:
    """Plain `cp -r` of the same files to the same disk, then `sync`: the data path's ceiling."""
    shutil.rmtree(dest, ignore_errors=True)
    result = measure(["sh", "-c", f"cp -r '{source}' '{dest}' && sync"])
    result["convert"] = float(result["wall"])
    result["startup"] = 0.0
    return result


def run_model_free_ptq(
    python: Path, source: Path, dest: Path, scheme: str, device: str = "cpu", workers: int = 1,
    path: str | None = None,
) -> dict[str, object]:
    """`path`: prepended to the peer's PYTHONPATH (its own site of wheels on a lent GPU node)."""
    shutil.rmtree(dest, ignore_errors=True)
    target = "cuda:0" if device == "cuda" else "cpu"
    code = (
        "import time; t=time.perf_counter(); from llmcompressor import model_free_ptq; "
        "i=time.perf_counter()-t; t=time.perf_counter(); "
        f"model_free_ptq({str(source)!r}, {str(dest)!r}, scheme={scheme!r}, ignore=['lm_head'], "
        f"max_workers={workers}, device={target!r}); print('CONVERT', time.perf_counter()-t, 'IMPORT', i)"
    )
    inherited = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [path, inherited]))} if path else None
    result = measure([str(python), "-c", code], env=env, gpu=device == "cuda")
    match = re.search(r"CONVERT ([0-9.]+) IMPORT ([0-9.]+)", str(result["output"]))
    assert match, result["output"]
    result["convert"] = float(match.group(1))
    result["startup"] = float(result["wall"]) - result["convert"]
    return result


def _row(tool: str, scheme: str, mib: float, r: dict[str, object]) -> tuple[object, ...]:
    busy = r.get("gpu_busy")
    return (
        tool, scheme, float(r["wall"]), float(r["convert"]), float(r["startup"]),  # type: ignore[arg-type]
        mib / float(r["convert"]), int(r["peak"]) / 2**30, str(r["peak_process"]),  # type: ignore[call-overload]
        "-" if busy is None else f"{float(busy):.0%}",  # type: ignore[arg-type]
    )


TARGETS_CPU = ("Targets (CPU): whole process >= 1.5x faster than model_free_ptq, largest process <= "
               "1.2 GB, pass-through >= 80% of cp's throughput.")
TARGETS_GPU = ("Targets (GPU node): W4A16 and FP8 converting throughput >= 3x the peer's best and >= 50% "
               "of the node's `cat` read rate.")
TARGETS_METHODS = ("Target (issue 12, on a GPU): search and hqq converting time at most 3x rtn's for the "
                   "whole checkpoint; CPU rows are for reference.")


def _gpu_name() -> str:
    return f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qf-bench"),
                        help="where the generated checkpoint and the outputs go; a checkpoint "
                             "already there is reused only if drawn with the same shape")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (12: 4.45 GiB)")
    parser.add_argument("--mlp", type=int, default=11008,
                        help="MLP width (14336 with --layers 32: the Llama-3-8B shape, 13.5 GiB)")
    parser.add_argument("--shards", type=int, default=3, help="source shards (default 3)")
    parser.add_argument("--experts", type=int, default=0,
                        help="routed experts per layer, each of width --mlp (a Qwen3-MoE shape; "
                        "default 0: a dense Llama shape)")
    parser.add_argument("--methods", default="rtn",
                        help="comma-separated data-free methods, a quantfleet row each (rtn, search, hqq)")
    parser.add_argument("--no-prefect", action="store_true",
                        help="run `quantfleet convert --no-prefect` (Ray only; a node without Prefect)")
    parser.add_argument("--peer-python", default=None,
                        help="the peer's interpreter as it is, instead of making benchmarks/.peer-venv")
    parser.add_argument("--peer-path", default=None,
                        help="prepended to the peer's PYTHONPATH (a folder of its installed wheels)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument("--schemes", default="W4A16,FP8",
                        help="comma-separated schemes; 'pass-through' keeps every tensor and runs cp "
                        "beside it")
    parser.add_argument("--skip-peer", action="store_true", help="measure quantfleet only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: quantfleet on the GPU node's GPU, model_free_ptq on cuda:0 with 1 and 4 "
                        "workers, GPU busy fraction sampled with nvidia-smi")
    parser.add_argument("--kernel-cache", choices=["ready", "cold", "both"], default="ready",
                        help="ready: kernels compiled beforehand, as setup.sh does (untimed); cold: an "
                        "empty kernel cache, a machine's very first conversion; both: a row each")
    parser.add_argument(
        "--shard-size",
        default="400MB",
        help="output shard size; a unit of work is one shard, so this sets how many workers get work",
    )
    args = parser.parse_args()
    source = args.workdir / "source"
    size = generate(source, args.layers, args.mlp, args.shards, args.experts)
    mib = size / 2**20
    print(f"source: {mib:,.0f} MiB in {len(list(source.glob('*.safetensors')))} shards", flush=True)
    peer = None if args.skip_peer else ensure_peer(args.peer_python)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []

    def record(tool: str, scheme: str, result: dict[str, object]) -> None:
        """One row, printed as soon as its run ends (a run cut off later loses none before it)."""
        result.pop("output", None)
        row = _row(tool, scheme, mib, result)
        rows.append(row)
        print(
            f"{tool:<30} {scheme:<12} wall {row[2]:6.1f} s, converting {row[3]:6.1f} s "
            f"({row[5]:6.0f} MiB/s), start-up {row[4]:5.1f} s, largest process {row[6]:.2f} GiB "
            f"({row[7]}), GPU busy {row[8]}",
            flush=True,
        )

    for scheme in args.schemes.split(","):
        states = {"ready": [False], "cold": [True], "both": [False, True]}[args.kernel_cache]
        if scheme == "pass-through":
            states = [False]  # keeps every tensor: compiles nothing
        for method in ["rtn"] if scheme == "pass-through" else methods:
            for cold in states:
                tool = ("quantfleet" + ("" if method == "rtn" else f", {method}")
                        + (", cold kernel cache" if cold else ""))
                record(tool, scheme, run_quantfleet(
                    source, args.workdir / f"qf-{scheme}", scheme, args.shard_size, args.device,
                    cold_kernels=cold, method=method, prefect=not args.no_prefect,
                ))
        if scheme == "pass-through":
            record("cp -r (same files, same disk)", scheme, run_cp(source, args.workdir / "cp"))
        elif peer is not None:
            for workers in (1, 4) if args.device == "cuda" else (1,):
                try:
                    result = run_model_free_ptq(
                        peer, source, args.workdir / f"mfp-{scheme}", MFP_SCHEMES[scheme], args.device,
                        workers, args.peer_path,
                    )
                except (SystemExit, OSError) as error:  # the peer's failure: our rows still count
                    print(f"model_free_ptq, {workers} worker(s), {scheme}: failed: {error}"[:2000],
                          flush=True)
                    continue
                record(f"llm-compressor model_free_ptq, {workers} worker(s)", scheme, result)
        for path in args.workdir.glob("*"):
            if path.name != "source":
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    table = [
        "| tool | scheme | wall | converting | MiB/s (converting) | fixed start-up "
        "| peak RSS, largest process | GPU busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {t} | {s} | {w:.1f} s | {c:.1f} s | {tp:,.0f} | {st:.1f} s | {p:.2f} GiB ({n}) | {g} |"
        for t, s, w, c, st, tp, p, n, g in rows
    ]
    if args.no_doc:
        return
    shape = (f"Qwen3-MoE-shaped bf16 checkpoint of {mib:,.0f} MiB in {args.shards} shards (hidden 4096, "
             f"{args.experts} routed experts of width {args.mlp} per layer, {args.layers} layers)"
             if args.experts else
             f"Llama-shaped bf16 checkpoint of {mib:,.0f} MiB in {args.shards} shards (hidden "
             f"4096, MLP {args.mlp}, {args.layers} layers)")
    update_section(
        ("Conversion" if args.device == "cpu" else "Conversion on a GPU node")
        + ("" if methods == ["rtn"] else ": methods") + (": MoE" if args.experts else ""),
        f"Measured with `.venv/bin/python benchmarks/convert.py --layers {args.layers} --mlp {args.mlp} "
        f"--shards {args.shards}{f' --experts {args.experts}' if args.experts else ''} "
        f"--device {args.device} --schemes {args.schemes} --methods {args.methods} "
        f"--shard-size {args.shard_size} --kernel-cache {args.kernel_cache}"
        f"{' --no-prefect' if args.no_prefect else ''}` "
        f"({machine_line()}{_gpu_name()}, load average "
        f"{os.getloadavg()[0]:.1f} at the end) "
        f"on a generated {shape}, output shards of {args.shard_size} (one work unit each), "
        "converted to local disk. Before each quantfleet row its kernels are compiled into the "
        "kernel cache, untimed, as setup.sh does; a 'cold kernel cache' row starts from an empty "
        "one. quantfleet runs `quantfleet convert` with "
        + ("no Prefect (`--no-prefect`)" if args.no_prefect else "Prefect's local mode")
        + " and a local Ray; its fixed start-up (Prefect's temporary "
        "server, Ray, planning) is reported apart from converting. model_free_ptq's start-up is its "
        "import time. pass-through keeps every tensor (only the data path: read, write, hash, "
        "publish); `cp -r` + `sync` copies the same files to the same disk. Peak RSS is the largest "
        "single process, sampled every 0.1 s over each run's process tree. "
        + (TARGETS_METHODS if methods != ["rtn"] else TARGETS_CPU if args.device == "cpu" else TARGETS_GPU)
        + "\n\n" + "\n".join(table),
    )


if __name__ == "__main__":
    main()
