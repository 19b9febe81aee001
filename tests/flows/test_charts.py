"""Report charts of MoE models: one series per projection, not one per routed expert."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from flows.charts import chart_kind, per_layer_chart, per_layer_series
from workers.records import TensorRecord


def _record(name: str, error: float) -> TensorRecord:
    return TensorRecord(name=name, scheme="W4A16", bytes_in=8, bytes_out=2, relative_error=error)


def _moe_records(experts: int = 64) -> list[TensorRecord]:
    records = []
    for layer in range(3):
        records.append(_record(f"model.layers.{layer}.self_attn.q_proj.weight", 0.01 * (layer + 1)))
        for expert in range(experts):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"
                records.append(_record(name, 0.05 + 0.001 * expert + 0.0001 * layer))
        records.append(_record(f"model.layers.{layer}.mlp.shared_experts.up_proj.weight", 0.02))
    return records


def test_routed_experts_fold_into_one_kind_per_projection() -> None:
    assert chart_kind("mlp.experts.17.up_proj") == "mlp.experts.*.up_proj"
    assert chart_kind("block_sparse_moe.experts.3.w1") == "block_sparse_moe.experts.*.w1"
    assert chart_kind("mlp.shared_experts.up_proj") == "mlp.shared_experts.up_proj"
    assert chart_kind("self_attn.q_proj") == "self_attn.q_proj"


def test_per_layer_series_shows_each_layers_worst_expert() -> None:
    series = per_layer_series(_moe_records())
    assert sorted(series) == ["mlp.experts.*.down_proj", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj",
                              "mlp.shared_experts.up_proj", "self_attn.q_proj"]
    worst = [(layer, 0.05 + 0.001 * 63 + 0.0001 * layer) for layer in range(3)]
    assert series["mlp.experts.*.up_proj"] == worst
    assert series["self_attn.q_proj"] == [(0, 0.01), (1, 0.02), (2, 0.03)]


def test_an_moe_chart_lays_out_without_warnings() -> None:
    # With a legend entry per expert, matplotlib gave up on the layout ("Tight layout not
    # applied") and printed its warning into the user's terminal.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = per_layer_chart(_moe_records(), "MoE: per-layer error")
    assert png is not None and png.startswith(b"\x89PNG")


def test_a_preloaded_pyplot_draws_the_same_chart() -> None:
    # A fresh interpreter, where nothing has imported pyplot yet: the preload must import it in the
    # background, and a chart drawn while (or after) it does so must be the one drawn without it.
    script = """
import sys, time
from flows.charts import per_layer_chart, preload_pyplot
from tests.flows.test_charts import _moe_records
preload = sys.argv[1] == "preload"
if preload:
    preload_pyplot()
    deadline = time.monotonic() + 60
    while "matplotlib.pyplot" not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.01)
    print("imported in the background:", "matplotlib.pyplot" in sys.modules)
sys.stdout.flush()
sys.stdout.buffer.write(per_layer_chart(_moe_records(4), "t") or b"")
"""
    root = Path(__file__).resolve().parents[2]
    runs = {
        mode: subprocess.run([sys.executable, "-c", script, mode], cwd=root, capture_output=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(root)}).stdout
        for mode in ("preload", "plain")
    }
    assert runs["preload"].startswith(b"imported in the background: True\n")
    png = runs["preload"].split(b"\n", 1)[1]
    assert png.startswith(b"\x89PNG") and png == runs["plain"]
