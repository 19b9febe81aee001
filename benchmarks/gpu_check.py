"""GPU path check: the same quantizers on CUDA give the CPU's bytes, and how fast they run.

    python benchmarks/gpu_check.py            # on a machine with an NVIDIA GPU; updates docs/benchmarks.md

For every scheme, one 8192x3072 bf16 weight is quantized on the CPU and on the GPU (eager and
compiled); every stored tensor must be bit-identical to the CPU's, and the error figures equal.
Throughput is MiB/s of bf16 input with the tensor already on the GPU (CUDA-synchronised, best
of 10). Exits non-zero if any result differs. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._doc import machine_line, update_section  # noqa: E402
from quantizers import get_scheme, quantize, scheme_names  # noqa: E402

SHAPE = (8192, 3072)


def _timed(fn, reps: int = 10) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (the CPU path is covered by the test suite)")
        return 0
    device = torch.cuda.get_device_name(0)
    weight = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    weight[7] = 0.0
    on_gpu = weight.cuda()
    mib = weight.numel() * 2 / 2**20
    rows, failures = [], 0
    for name in scheme_names():
        scheme = get_scheme(name)
        reference = quantize(weight, scheme, compile=False)
        verdicts = []
        for compiled in (False, True):
            result = quantize(on_gpu, scheme, compile=compiled)
            same = all(
                torch.equal(t.cpu().view(torch.uint8), reference.tensors[k].view(torch.uint8))
                for k, t in result.tensors.items()
            )
            same = same and abs(result.error.sqnr_db - reference.error.sqnr_db) < 1e-6
            verdicts.append(same)
            failures += not same
        eager = _timed(lambda: quantize(on_gpu, scheme, compile=False))  # noqa: B023
        compiled_time = _timed(lambda: quantize(on_gpu, scheme, compile=True))  # noqa: B023
        rows.append(f"| {name} | {'yes' if verdicts[0] else '**NO**'} | {'yes' if verdicts[1] else '**NO**'} "
                    f"| {mib / eager:,.0f} | {mib / compiled_time:,.0f} |")
        print(rows[-1], flush=True)
    table = ["| scheme | eager = CPU bytes | compiled = CPU bytes | eager MiB/s | compiled MiB/s |",
             "|---|---|---|---|---|", *rows]
    update_section(
        "Quantizers on GPU",
        f"Measured with `python benchmarks/gpu_check.py` on {device} ({machine_line()}), one "
        f"{SHAPE[0]}x{SHAPE[1]} bf16 weight already on the GPU, best of 10.\n\n" + "\n".join(table),
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
