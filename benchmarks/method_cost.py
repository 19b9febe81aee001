"""What `search` and `hqq` cost per tensor next to `rtn`, for every scheme a method applies to.

    .venv/bin/python benchmarks/method_cost.py [--shape 1024x2048] [--device cpu|cuda] [--no-doc]

One bf16 weight of `--shape` (default 1024x2048: a routed expert's size, under the compile
threshold, so every method runs eagerly, as it does for the many small tensors of a MoE), quantized
by `quantizers.quantize` (what a worker runs) with each method, best of 5 after one warm-up call.
A shape of 4M elements or more runs RTN's kernels and the methods' steps compiled; in a
conversion, so do tensors from 1M elements when the model also holds such large ones.
Only the quantize call is timed: reads, writes and the read-back check of a conversion are not, so
these ratios are upper bounds of what a method adds to a whole conversion. Updates the section
"Methods: cost per tensor" of docs/benchmarks.md unless --no-doc.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._doc import best_seconds, machine_line, update_section  # noqa: E402
from quantizers import get_scheme, quantize  # noqa: E402
from quantizers.kernels import compiles  # noqa: E402

SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "FP8", "NVFP4A16")  # MXFP4's scales are fixed: rtn only
METHODS = ("rtn", "search", "hqq")
NAME = "model.layers.0.mlp.experts.0.up_proj.weight"


def _method_seconds(weight: torch.Tensor, scheme: str, method: str, reps: int = 5) -> float:
    def once() -> None:
        quantize(weight, get_scheme(scheme), name=NAME, method=method)
        if weight.is_cuda:
            torch.cuda.synchronize()

    once()  # warm-up: first-call costs are not the method's
    return best_seconds(once, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1024x2048", help="rows x columns of the weight")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    rows, columns = (int(v) for v in args.shape.lower().split("x"))
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(torch.bfloat16).to(args.device)
    path = "compiled" if compiles(weight.numel()) else "eager"
    table = ["| scheme | rtn | search | hqq |", "|---|---|---|---|"]
    for scheme in SCHEMES:
        seconds = {method: _method_seconds(weight, scheme, method) for method in METHODS}
        rtn = seconds["rtn"]
        cells = [f"{rtn * 1e3:.1f} ms"] + [
            f"{seconds[m] * 1e3:.1f} ms ({seconds[m] / rtn:.1f}x)" for m in METHODS[1:]
        ]
        table.append(f"| {scheme} | " + " | ".join(cells) + " |")
        print(f"{scheme:<11} " + ", ".join(f"{m} {seconds[m] * 1e3:.1f} ms" for m in METHODS), flush=True)
    if args.no_doc:
        return
    device = torch.cuda.get_device_name() if weight.is_cuda else f"cpu, {torch.get_num_threads()} threads"
    update_section(
        f"Methods: cost per tensor ({'cuda' if weight.is_cuda else 'cpu'})",
        f"Measured with `.venv/bin/python benchmarks/method_cost.py --shape {args.shape} --device "
        f"{args.device}` ({machine_line()}, {device}): one {rows}x{columns} bf16 weight, RTN's kernels "
        f"{path}, `quantize()` best of 5; the methods' multiple of RTN in brackets. Only the "
        "quantize call is timed (no reads, writes or read-back check), so the ratios are upper bounds "
        "of what a method adds to a conversion.\n\n" + "\n".join(table),
    )


if __name__ == "__main__":
    main()
