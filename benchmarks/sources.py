"""Converting a block-FP8 source vs its bf16 equivalent to W4A16, end to end on CPU.

    .venv/bin/python benchmarks/sources.py [--workdir /tmp/qf-sources] [--layers 6]

Generates the Llama-shaped bf16 checkpoint of `benchmarks/convert.py` (hidden 4096, MLP 11008;
6 layers ~ 2.6 GB), writes its block-FP8 twin as DeepSeek publishes one (E4M3 weights, float32
`weight_scale_inv` per 128x128 tile, `quant_method: fp8`), and converts each with `quantfleet
convert --no-prefect` in its own process (local Ray). Throughput is the bf16-equivalent bytes over
the conversion time the CLI reports (start-up excluded), so both rows measure the same work;
the target is block-FP8 >= 80% of bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._doc import machine_line, update_section  # noqa: E402
from benchmarks.convert import generate, measure  # noqa: E402


def to_block_fp8(bf16: Path, out: Path) -> int:
    """Write the block-FP8 twin of `bf16` (every 2-D projection quantized); returns its bytes."""
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return sum(p.stat().st_size for p in out.glob("*.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(bf16 / file)
        stored: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if name.endswith("_proj.weight"):
                rows, cols = tensor.shape
                tiles = tensor.float().view(math.ceil(rows / 128), 128, math.ceil(cols / 128), 128)
                scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
                q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows, cols)
                stored[name], stored[f"{name}_scale_inv"] = q, scale
            else:
                stored[name] = tensor
        save_file(stored, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in stored})
        del tensors, stored
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(config))
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def convert_in_process(source: Path, dest: Path) -> dict[str, object]:
    """The workers' part alone (plan, then every unit in this process): no Ray start-up, which on
    a crowded machine can time out and would dominate a small benchmark."""
    import time

    from benchmarks._doc import peak_rss_bytes, reset_peak_rss
    from flows.pipeline import check_not_published, plan_conversion, unit_context
    from flows.recipe import Recipe
    from workers.convert_unit import convert_unit

    shutil.rmtree(dest, ignore_errors=True)
    reset_peak_rss()
    plan = plan_conversion(str(source), Recipe.preset("W4A16"), shard_size=1_000_000_000)
    context = unit_context(plan, check_not_published(str(dest)), "cpu")
    started = time.perf_counter()
    for unit in plan.units:
        convert_unit(unit, context)
    return {"convert": time.perf_counter() - started, "peak": peak_rss_bytes()}


def convert(source: Path, dest: Path) -> dict[str, object]:
    shutil.rmtree(dest, ignore_errors=True)
    result = measure(
        [sys.executable, "-m", "flows.cli", "convert", str(source), str(dest), "--scheme", "W4A16",
         "--no-prefect", "--shard-size", "1GB"],
        env={"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)},
    )
    pattern = r"Time: ([0-9.]+) s in all: ([0-9.]+) s converting and publishing"
    match = re.search(pattern, str(result["output"]))
    assert match, result["output"]
    result["convert"] = float(match.group(2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/qf-sources")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--record", action="store_true", help="write the figures to docs/benchmarks.md")
    parser.add_argument("--repeat", type=int, default=2, help="runs per source; the last one counts")
    parser.add_argument("--in-process", action="store_true",
                        help="run the units in this process (no Ray, no publishing); both sources alike")
    args = parser.parse_args()
    work = Path(args.workdir)
    bf16_bytes = generate(work / "bf16", args.layers)
    fp8_bytes = to_block_fp8(work / "bf16", work / "fp8")
    rows = []
    figures = {}
    # In-process, the first run of each source also pays torch.compile's warm-up (tens of seconds
    # per kernel on a small machine, once per worker process): the last of `--repeat` runs counts.
    for label, source, size in (("block-FP8", work / "fp8", fp8_bytes), ("bf16", work / "bf16", bf16_bytes)):
        run = convert_in_process if args.in_process else convert
        for _ in range(args.repeat):
            result = run(source, work / f"out-{label}")
        seconds = float(str(result["convert"]))
        figures[label] = bf16_bytes / seconds
        rows.append(f"| {label} | {size / 1e9:.2f} GB | {seconds:.1f} s | "
                    f"{bf16_bytes / seconds / 1e6:.0f} MB/s | {int(str(result['peak'])) / 2**30:.2f} GiB |")
        print(rows[-1], flush=True)
    ratio = figures["block-FP8"] / figures["bf16"]
    print(f"block-FP8 throughput = {ratio:.0%} of bf16 (target >= 80%)")
    body = "\n".join([
        f"{machine_line()}; `benchmarks/sources.py --layers {args.layers}"
        f"{' --in-process' if args.in_process else ''} --repeat {args.repeat}` (Llama-shaped, W4A16, "
        f"{'units run in one process' if args.in_process else '`convert --no-prefect`, local Ray'}). "
        "Throughput = bf16-equivalent bytes / conversion time.",
        "",
        "| source | source size | conversion | throughput | peak RSS (one process) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Block-FP8 throughput is {ratio:.0%} of bf16 (target >= 80%).",
    ])
    if args.record:
        update_section("Quantized sources: block-FP8 vs bf16", body)


if __name__ == "__main__":
    main()
