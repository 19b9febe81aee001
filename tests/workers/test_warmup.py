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


def test_warm_up_compiles_the_kernels_the_plan_will_compile() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QUANTFLEET_COMPILE": "auto"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The int kernels: scales and codes (quantize), and the dequantizer (the output-error probes).
    assert result["compiled"] == ["_int_codes", "_int_dequant_kernel", "_int_scales"]
    assert result["seconds"] > 0


def test_warm_up_of_small_tensors_compiles_nothing() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QUANTFLEET_COMPILE": "auto"}
    script = _SCRIPT.replace("(COMPILE_MIN_ELEMENTS, 1000)", "(1000, 1000)")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1])["compiled"] == []
