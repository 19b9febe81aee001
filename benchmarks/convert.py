"""End-to-end conversion of a generated 4-5 GB bf16 Llama-shaped checkpoint, side by side with
llm-compressor's `model_free_ptq` on the same input in the same run.

    .venv/bin/python benchmarks/convert.py [--workdir /tmp/qf-bench] [--layers 10]

Each tool runs as a user runs it, in its own process: `quantfleet convert` (Prefect local mode,
local Ray with one worker per core) and `model_free_ptq` (llmcompressor 0.14, which needs older
transformers/compressed-tensors, so it runs from `benchmarks/.peer-venv`, created on first use).
Figures: wall time, throughput (bf16 input / conversion time), the fixed start-up quantfleet
reports separately (Prefect, Ray, planning), and the peak RSS of the largest process of each
run (sampled over the whole process tree, Ray workers included).
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


def generate(path: Path, layers: int) -> int:
    """A Llama-shaped bf16 checkpoint (hidden 4096, MLP 11008) in 3 shards; returns its bytes."""
    if (path / "model.safetensors.index.json").exists():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    hidden, mlp, vocab, kv = 4096, 11008, 32000, 1024
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
            (f"{p}.mlp.gate_proj.weight", (mlp, hidden)),
            (f"{p}.mlp.up_proj.weight", (mlp, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, mlp)),
        ]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    total = sum(2 * torch.Size(s).numel() for _, s in names)
    per_shard = total // 3 + 1
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        if size > per_shard:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += 2 * torch.Size(shape).numel()
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in shard}
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
    (path / "config.json").write_text(json.dumps(config))
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


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


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    stop, peak = threading.Event(), {}
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
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {
        "wall": wall,
        "peak": peak.get("peak", 0),
        "peak_process": peak.get("name", "?"),
        "output": output,
    }


def ensure_peer() -> Path:
    python = PEER / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
        for package in PEER_PACKAGES:  # torch first, pinned, so pip takes the CPU build
            subprocess.run([str(python), "-m", "pip", "install", "-q", package], check=True)
    return python


def run_quantfleet(source: Path, dest: Path, scheme: str, shard_size: str) -> dict[str, object]:
    shutil.rmtree(dest, ignore_errors=True)
    result = measure(
        [
            str(ROOT / ".venv" / "bin" / "quantfleet"),
            "convert",
            str(source),
            str(dest),
            "--scheme",
            scheme,
            "--shard-size",
            shard_size,
        ],
        env={"PREFECT_API_URL": "", "RAY_AUTH_MODE": "disabled"},
    )
    match = re.search(
        r"Time: ([0-9.]+) s in all: ([0-9.]+) s converting and publishing", str(result["output"])
    )
    assert match, result["output"]
    result["convert"] = float(match.group(2))
    result["startup"] = float(match.group(1)) - float(match.group(2))
    return result


def run_model_free_ptq(python: Path, source: Path, dest: Path, scheme: str) -> dict[str, object]:
    shutil.rmtree(dest, ignore_errors=True)
    code = (
        "import time; t=time.perf_counter(); from llmcompressor import model_free_ptq; "
        "i=time.perf_counter()-t; t=time.perf_counter(); "
        f"model_free_ptq({str(source)!r}, {str(dest)!r}, scheme={scheme!r}, ignore=['lm_head'], "
        "max_workers=1, device='cpu'); print('CONVERT', time.perf_counter()-t, 'IMPORT', i)"
    )
    result = measure([str(python), "-c", code])
    match = re.search(r"CONVERT ([0-9.]+) IMPORT ([0-9.]+)", str(result["output"]))
    assert match, result["output"]
    result["convert"] = float(match.group(1))
    result["startup"] = float(result["wall"]) - result["convert"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qf-bench"))
    parser.add_argument("--layers", type=int, default=10, help="decoder layers (10: about 4.7 GB)")
    parser.add_argument("--schemes", default="W4A16,FP8")
    parser.add_argument("--skip-peer", action="store_true", help="measure quantfleet only")
    parser.add_argument(
        "--shard-size",
        default="400MB",
        help="output shard size; a unit of work is one shard, so this sets how many workers get work",
    )
    args = parser.parse_args()
    source = args.workdir / "source"
    size = generate(source, args.layers)
    mib = size / 2**20
    print(f"source: {mib:,.0f} MiB in {len(list(source.glob('*.safetensors')))} shards", flush=True)
    peer = None if args.skip_peer else ensure_peer()
    rows = []
    for scheme in args.schemes.split(","):
        ours = run_quantfleet(source, args.workdir / f"qf-{scheme}", scheme, args.shard_size)
        runs = [("quantfleet", ours)]
        if peer is not None:
            runs.append(
                (
                    "llm-compressor model_free_ptq",
                    run_model_free_ptq(peer, source, args.workdir / f"mfp-{scheme}", MFP_SCHEMES[scheme]),
                )
            )
        for tool, r in runs:
            row = (
                tool,
                scheme,
                float(r["wall"]),
                float(r["convert"]),
                float(r["startup"]),
                mib / float(r["convert"]),
                int(r["peak"]) / 2**30,
                str(r["peak_process"]),
            )
            rows.append(row)
            print(
                f"{tool:<30} {scheme:<6} wall {row[2]:6.1f} s, converting {row[3]:6.1f} s "
                f"({row[5]:6.0f} MiB/s), start-up {row[4]:5.1f} s, largest process {row[6]:.2f} GiB "
                f"({row[7]})",
                flush=True,
            )
    table = [
        "| tool | scheme | wall | converting | MiB/s (converting) | fixed start-up "
        "| peak RSS, largest process |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {t} | {s} | {w:.1f} s | {c:.1f} s | {tp:,.0f} | {st:.1f} s | {p:.2f} GiB ({n}) |"
        for t, s, w, c, st, tp, p, n in rows
    ]
    update_section(
        "Conversion",
        f"Measured with `.venv/bin/python benchmarks/convert.py --layers {args.layers}` ({machine_line()}) "
        f"on a generated Llama-shaped bf16 checkpoint of {mib:,.0f} MiB in 3 shards (hidden 4096, "
        f"MLP 11008), output shards of {args.shard_size} (one work unit each), "
        "converted to local disk. quantfleet runs `quantfleet convert` with Prefect's "
        "local mode and a local Ray (one worker per core); its fixed start-up (Prefect's temporary "
        "server, Ray, planning) is reported apart from converting. model_free_ptq runs with "
        "max_workers=1 on CPU; its start-up is its import time. Peak RSS is the largest single "
        "process, sampled every 0.1 s over each run's process tree. Targets: 3x model_free_ptq's "
        "throughput and under 1 GB per worker.\n\n" + "\n".join(table),
    )


if __name__ == "__main__":
    main()
