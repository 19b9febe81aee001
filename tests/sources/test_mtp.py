"""DeepSeek's multi-token-prediction layer, which transformers drops, is carried through unchanged.

A tiny DeepSeek-V3 gets an MTP layer (`model.layers.2.*` of a 2-layer model, declared by
`num_nextn_predict_layers: 1`) and is saved as a block-FP8 source. Converted to W4A16, the main
layers are re-quantized while every MTP tensor is stored exactly as the source holds it: fp8
weights and their tile scales byte for byte (scales renamed `weight_scale`, in an FP8 block config
group naming those modules), dense tensors byte for byte outside every config group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.sources.builders import add_mtp_layer, run_plain, save_block_fp8, tiny_deepseek

MTP = "model.layers.2."


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("mtp")
    bf16 = tiny_deepseek(root / "bf16")
    names = add_mtp_layer(bf16)
    save_block_fp8(bf16, root / "fp8", root / "reference")
    return bf16, root / "fp8", names


def test_mtp_layer_of_a_block_fp8_source_is_carried_through_exactly(sources, tmp_path) -> None:
    _, fp8, names = sources
    out = tmp_path / "w4"
    run_plain(str(fp8), str(out), "W4A16")
    source, stored = _tensors(fp8), _tensors(out)
    fp8_weights = [n for n in names if source[n].dtype == torch.float8_e4m3fn]
    dense = [n for n in names if n not in fp8_weights]
    assert len(fp8_weights) > 10 and f"{MTP}eh_proj.weight" in fp8_weights
    assert f"{MTP}shared_head.head.weight" in dense and f"{MTP}embed_tokens.weight" in dense
    for name in fp8_weights:
        assert _same_bytes(stored[name], source[name]), name
        assert _same_bytes(stored[name.removesuffix("weight") + "weight_scale"], source[f"{name}_scale_inv"])
    for name in dense:
        assert _same_bytes(stored[name], source[name]), name
    assert not [n for n in stored if n.startswith(MTP) and n.endswith(("weight_packed", "_scale_inv"))]
    # The main layers were re-quantized to the target.
    assert "model.layers.1.self_attn.o_proj.weight_packed" in stored
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    fp8_group = [g for g in groups.values() if g["weights"]["strategy"] == "block"]
    assert len(fp8_group) == 1 and sorted(fp8_group[0]["targets"]) == sorted(
        n.removesuffix(".weight") for n in fp8_weights)
    manifest = json.loads((out / "quantfleet.json").read_text())
    carried = {t["name"] for t in manifest["tensors"] if t["source"] and "carried over, exact" in t["source"]}
    assert carried == set(fp8_weights)


def test_mtp_layer_of_a_bf16_source_stays_as_it_is(sources, tmp_path) -> None:
    bf16, _, names = sources
    out = tmp_path / "w4"
    run_plain(str(bf16), str(out), "W4A16")
    source, stored = _tensors(bf16), _tensors(out)
    for name in names:
        assert _same_bytes(stored[name], source[name]), name
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    targets = [t for g in groups.values() for t in g["targets"]]
    assert targets and not [t for t in targets if t.startswith(MTP)]
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
