"""Warming a worker compiles exactly the kernels its units will compile, and no others.

Run in a fresh interpreter: which kernels a process has compiled is per-process state, and the
test session's other tests compile kernels of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import json, sys
from quantizers.kernels import COMPILE_MIN_ELEMENTS, compile_seconds
from quantizers.presets import get_scheme
from workers.warmup import warm_up

# W8A16's largest tensor is compiled-size, FP8's is not: only the int kernels get compiled.
seconds = warm_up((get_scheme("W8A16"), get_scheme("FP8")), (COMPILE_MIN_ELEMENTS, 1000), "cpu")
print(json.dumps({"seconds": seconds, "compiled": sorted(compile_seconds())}))
"""


def _run_fresh(script: str, *args: str) -> dict[str, Any]:
    """`script` in a fresh interpreter (compiling by size, as workers do); its last line, as JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QUANTFLEET_COMPILE": "auto"}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_warm_up_compiles_the_kernels_the_plan_will_compile() -> None:
    result = _run_fresh(_SCRIPT)
    # The int kernels: scales and codes (quantize; the codes kernel also writes the dequantized
    # weight the output-error probes use, so no dequantizer); 8-bit codes pack without a kernel.
    assert result["compiled"] == ["_int_codes", "_int_scales"]
    assert result["seconds"] > 0


# After warming, a unit's weights compile nothing more: one read from a file as units read it (a
# view of the buffer it was mapped or read into), a fresh one, both of shapes unlike the warm-up's.
_FIRST_UNIT_SCRIPT = """
import json, sys
import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters
from infra.safetensors.header import read_header
from infra.safetensors.reader import TensorReader
from infra.storage import open_storage
from quantizers import estimate_output_error, probe_vectors, quantize
from quantizers.kernels import COMPILE_MIN_ELEMENTS, compile_seconds
from quantizers.presets import get_scheme
from workers.warmup import warm_up

scheme, method = get_scheme(sys.argv[2]), sys.argv[3]
warm_up((scheme,), (COMPILE_MIN_ELEMENTS,), "cpu", methods=(method,))
warmed = sorted(compile_seconds())
frames = counters["frames"]["ok"]
folder = sys.argv[1]
save_file({"w": (torch.randn(2304, 3072) * 0.02).to(torch.bfloat16)}, folder + "/w.safetensors")
storage = open_storage(folder)
with TensorReader(storage) as reader:
    read = reader.read("w.safetensors", read_header(storage, "w.safetensors").tensors[0])
fresh = (torch.randn(3328, 2560) * 0.02).to(torch.bfloat16)
# As a unit does: the conversion keeps the dequantized weight its probes use; NVFP4 partners and
# the largest tensors probe a sample quantized on its own; they and the measure pass keep nothing.
for weight in (read, fresh):
    probes = probe_vectors(weight.shape[1])
    result = quantize(weight, scheme, name="w", method=method, keep_dequantized=True)
    estimate_output_error(weight, scheme, probes, method=method, quantized=result)
    estimate_output_error(weight, scheme, probes, budget=2048, method=method)
    quantize(weight, scheme, name="w", method=method)
print(json.dumps({"warmed": warmed, "base": read._base is not None,
                  "compiled after warming": counters["frames"]["ok"] - frames}))
"""


def test_after_warm_up_a_units_weights_compile_nothing(tmp_path: Path) -> None:
    result = _run_fresh(_FIRST_UNIT_SCRIPT, str(tmp_path), "W4A16", "rtn")
    assert result["base"], "the read weight should be a view of its read buffer, as in a unit"
    # The packing kernel too: it decides by its own size, and the warm-up weight is large enough.
    # (Nothing unpacks: the probes take the dequantized weight from the codes kernel.)
    assert result["warmed"] == ["_int_codes", "_int_scales", "_words_from_nibbles"]
    assert result["compiled after warming"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "method", "step"), [
    ("NVFP4A16", "search", "_scale_candidate"), ("W4A16_ASYM", "hqq", "_asymmetric_sums")])
def test_warm_up_compiles_a_methods_steps_for_every_shape(
    tmp_path: Path, scheme: str, method: str, step: str
) -> None:
    # The steps see chunks of rows whose count varies with the weight's shape: still one graph.
    result = _run_fresh(_FIRST_UNIT_SCRIPT, str(tmp_path), scheme, method)
    assert step in result["warmed"]
    assert result["compiled after warming"] == 0


def test_warm_up_of_small_tensors_compiles_nothing() -> None:
    script = _SCRIPT.replace("(COMPILE_MIN_ELEMENTS, 1000)", "(1000, 1000)")
    assert _run_fresh(script)["compiled"] == []
