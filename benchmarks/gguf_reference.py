"""Compare quantfleet's GGUF quantizers with llama.cpp's own reference C code, byte for byte.

llama-cpp-python takes well over an hour to build on a busy 2-core machine, so this check compiles
only `ggml/src/ggml-quants.c` from a llama.cpp source tree (the llama-cpp-python sdist carries one
under vendor/llama.cpp) into a small library and calls `quantize_row_*_ref` -- the functions
`llama_model_quantize` uses when no importance matrix is given -- on the same float input.

    python -m benchmarks.gguf_reference /path/to/llama.cpp
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from quantizers.gguf import quantize_gguf, row_bytes

__all__ = ["build_reference", "compare"]

_STUBS = """
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char *f, int l, const char *fmt, ...) { abort(); }
size_t ggml_row_size(int t, long n) { abort(); }
const char *ggml_type_name(int t) { abort(); }
size_t ggml_type_size(int t) { abort(); }
"""
_FUNCTIONS = {"Q8_0": "quantize_row_q8_0_ref", "Q4_K": "quantize_row_q4_K_ref",
              "Q5_K": "quantize_row_q5_K_ref", "Q6_K": "quantize_row_q6_K_ref"}


def build_reference(llama_cpp: Path, out: Path) -> ctypes.CDLL:
    """ggml-quants.c compiled as llama.cpp compiles ggml-base (-O3, no -march: no FMA contraction)."""
    ggml = llama_cpp / "ggml"
    stubs = out / "stubs.c"
    stubs.write_text(_STUBS)
    library = out / "libggml_quants_ref.so"
    subprocess.run(
        ["gcc", "-O3", "-std=gnu11", "-fPIC", "-shared", "-DNDEBUG", f"-I{ggml / 'include'}",
         f"-I{ggml / 'src'}", str(ggml / "src" / "ggml-quants.c"), str(stubs), "-o", str(library), "-lm"],
        check=True,
    )
    return ctypes.CDLL(str(library))


def _reference(library: ctypes.CDLL, weight: torch.Tensor, type_name: str) -> np.ndarray:
    x = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
    out = np.zeros((weight.shape[0], row_bytes(type_name, weight.shape[1])), dtype=np.uint8)
    function = getattr(library, _FUNCTIONS[type_name])
    function(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


def compare(library: ctypes.CDLL) -> list[tuple[str, str, int, int]]:
    """(case, type, rows that differ, rows) for a few f16/bf16 weights, edge cases included."""
    generator = torch.Generator().manual_seed(0)
    normal = (torch.randn(64, 1024, generator=generator) * 0.02).half().float()
    edge = normal.clone()
    edge[0, :40], edge[1, 256:], edge[2, :32] = 0.0, 0.3, edge[2, :32] * 1e-4
    cases = {
        "f16 N(0, 0.02)": normal,
        "bf16 mixed scales": (torch.randn(64, 1024, generator=generator)
                              * torch.rand(64, 1, generator=generator) * 3).bfloat16().float(),
        "f16 heavy tails": torch.randn(64, 512, generator=generator).pow(3).half().float(),
        "f16 sparse": (torch.randn(32, 512, generator=generator)
                       * (torch.rand(32, 512, generator=generator) < 0.1)).half().float(),
        "f16 edge blocks": edge,
    }
    rows = []
    for case, weight in cases.items():
        for type_name in _FUNCTIONS:
            ours = quantize_gguf(weight, type_name).numpy()
            theirs = _reference(library, weight, type_name)
            rows.append((case, type_name, int((ours != theirs).any(axis=1).sum()), weight.shape[0]))
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        library = build_reference(Path(sys.argv[1]), Path(scratch))
        for case, type_name, differ, total in compare(library):
            print(f"{case:20s} {type_name:5s} {total - differ}/{total} rows byte-identical")


if __name__ == "__main__":
    main()
