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

from workers.units import TensorJob
from workers.warmup import kept_variants

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


# A plan whose weights all keep their dequantized weight for the probes (kept_variants: (True,))
# warms that variant of the codes kernel alone: its units compile nothing, and the variant left
# out (which its units never run) would still compile.
_KEPT_ONLY_SCRIPT = """
import json
import torch
from torch._dynamo.utils import counters
from quantizers import estimate_output_error, probe_vectors, quantize
from quantizers.kernels import COMPILE_MIN_ELEMENTS
from quantizers.presets import get_scheme
from workers.warmup import warm_up

scheme = get_scheme("W4A16")
warm_up((scheme,), (COMPILE_MIN_ELEMENTS,), "cpu", variants=((True,),))
frames = counters["frames"]["ok"]
for shape in ((768, 4096), (4096, 768), (2304, 3072)):
    weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    result = quantize(weight, scheme, name="w", keep_dequantized=True)
    estimate_output_error(weight, scheme, probe_vectors(shape[1]), quantized=result)
kept = counters["frames"]["ok"] - frames
quantize(weight, scheme, name="w", keep_dequantized=False)
print(json.dumps({"kept": kept, "not kept": counters["frames"]["ok"] - frames - kept}))
"""


def test_warming_only_the_kept_variant_serves_units_that_keep() -> None:
    result = _run_fresh(_KEPT_ONLY_SCRIPT)
    assert result["kept"] == 0
    assert result["not kept"] > 0


def _job(shape: tuple[int, int], *, scheme: int | None = 0,
         partners: tuple[TensorJob, ...] = ()) -> TensorJob:
    return TensorJob(name="w", file="f", begin=0, end=0, dtype="BF16", shape=shape, scheme=scheme,
                     partners=partners)


def test_kept_variants_are_those_the_units_run() -> None:
    expert, attention, huge = _job((768, 4096)), _job((4096, 4096)), _job((14336, 4096))
    kept_only, both = (True,), (True, False)
    assert kept_variants([expert, attention], 1, probes=16) == (kept_only,)
    # Over 16M elements and 1024 rows: quantized without keeping, its sample probed with it.
    assert kept_variants([expert, huge], 1, probes=16) == (both,)
    # NVFP4 partners share a global scale: quantized without keeping, a sample probed on its own.
    assert kept_variants([_job((1024, 4096), partners=(expert,))], 1, probes=16) == (both,)
    # No probes: nothing keeps. Per scheme; copied and unquantized tensors need no kernel.
    assert kept_variants([expert], 1, probes=0) == ((False,),)
    assert kept_variants([expert, _job((64, 64), scheme=None), _job(huge.shape, scheme=1)], 3, probes=16) == (
        kept_only, both, ())


def test_warm_up_of_small_tensors_compiles_nothing() -> None:
    script = _SCRIPT.replace("(COMPILE_MIN_ELEMENTS, 1000)", "(1000, 1000)")
    assert _run_fresh(script)["compiled"] == []
