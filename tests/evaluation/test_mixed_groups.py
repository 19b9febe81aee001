"""Evaluating what quantfleet writes, with every scheme, on a model whose layers get two group sizes.

A SmolLM2-shaped Llama (hidden 576, MLP 1536) is converted with each scheme by `quantfleet convert
--evaluate` (the real pipeline on a local Ray); int schemes store its 576-wide projections with
group 64 and down_proj with group 128, in two config groups, which transformers' own dequantizing
path could not load. The same outputs are then evaluated by `quantfleet evaluate`, and their
loaded weights compared bit for bit with quantfleet's dequantizer.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flows.cli import main
from quantizers import dequantize, get_scheme, resolve_scheme, scheme_names
from workers.evaluation.dequantized import load_dequantized

# Seven real conversions, each evaluated, then seven evaluations: the module takes a while.
pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]

EVAL = {"max_tokens": 128, "context": 64}
FOUR_BIT = ("W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16")


@pytest.fixture(scope="module")
def converted(smol_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each scheme's published output of `quantfleet convert --evaluate` (without Prefect)."""
    root = tmp_path_factory.mktemp("converted")
    outputs = {}
    for name in scheme_names():
        recipe = root / f"{name}.yaml"
        recipe.write_text(f"scheme: {name}\nevaluate: {json.dumps(EVAL)}\n")  # a short text
        dest = root / name
        code = main(["convert", str(smol_llama), str(dest), "--recipe", str(recipe), "--evaluate",
                     "--no-prefect", "--shard-size", "20MB"])
        assert code == 0, name
        outputs[name] = dest
    return outputs


def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> file of a checkpoint folder (an index, or one model.safetensors)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return dict.fromkeys(handle.keys(), "model.safetensors")


def _figures(path: Path) -> dict[str, float]:
    return json.loads((path / "quantfleet.json").read_text())["evaluation"]


def test_convert_evaluate_gives_sane_figures_for_every_scheme(converted) -> None:
    kl = {}
    for name, dest in converted.items():
        figures = _figures(dest)
        assert figures["scored_tokens"] > 0, name
        for key in ("mean_kl", "p99_kl", "top1", "ppl_original", "ppl_quantized"):
            assert math.isfinite(figures[key]), (name, key)
        assert 0 < figures["mean_kl"] <= figures["p99_kl"], name
        kl[name] = figures["mean_kl"]
    # 8-bit int is close to the original; every 4-bit scheme is further away than either 8-bit one.
    assert kl["W8A16"] < 0.01 and _figures(converted["W8A16"])["top1"] > 0.9
    for name in FOUR_BIT:
        assert kl[name] > max(kl["W8A16"], kl["FP8"], kl["FP8_BLOCK"]), kl
    # The int schemes really did mix group sizes (the case that used to crash).
    for name in ("W8A16", "W4A16", "W4A16_ASYM"):
        groups = json.loads((converted[name] / "config.json").read_text())["quantization_config"]
        sizes = {g["weights"]["group_size"] for g in groups["config_groups"].values()}
        assert sizes == {64, 128}, (name, sizes)


@pytest.mark.parametrize("name", scheme_names())
def test_quantfleet_evaluate_reproduces_the_convert_figures(converted, smol_llama, tmp_path, capsys,
                                                            name) -> None:
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(smol_llama), str(converted[name]), "--max-tokens", str(EVAL["max_tokens"]),
                 "--context", str(EVAL["context"]), "--json", str(out)]) == 0
    assert "mean KL divergence" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    expected = _figures(converted[name])
    for key in ("mean_kl", "top1", "ppl_quantized"):
        assert figures[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-7), key


@pytest.mark.parametrize("name", scheme_names())
def test_loaded_weights_are_exactly_our_dequantized_weights(converted, smol_llama, name) -> None:
    dest = converted[name]
    model = load_dequantized(dest, causal=True, dtype=torch.float32)
    weights = model.state_dict()
    index = _weight_map(dest)
    modules = sorted({k.rsplit(".", 1)[0] for k in index if k.endswith("weight_scale")})
    assert len(modules) == 14  # 7 Linears per layer, 2 layers
    for module in modules:
        stored = {}
        for key, file in index.items():
            if key.rsplit(".", 1)[0] == module:
                with safe_open(str(dest / file), "pt") as handle:
                    stored[key.rsplit(".", 1)[1]] = handle.get_tensor(key)
        shape = tuple(weights[f"{module}.weight"].shape)
        scheme = resolve_scheme(get_scheme(name), shape).scheme  # independent of the config's groups
        expected = dequantize(stored, scheme).float()
        assert torch.equal(weights[f"{module}.weight"], expected), module
    # Unquantized tensors are the original's; the tied head is the embedding.
    embedding = "model.embed_tokens.weight"
    source = _weight_map(smol_llama)
    with safe_open(str(smol_llama / source[embedding]), "pt") as handle:
        assert torch.equal(weights[embedding], handle.get_tensor(embedding).float())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_missing_scale_is_one_line_naming_checkpoint_and_tensor(converted, smol_llama, tmp_path,
                                                                   capsys) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(converted["W8A16"], damaged)
    name = "model.layers.1.mlp.down_proj.weight_scale"
    shard = damaged / _weight_map(damaged)[name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = damaged / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        del index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    code = main(["evaluate", str(smol_llama), str(damaged), "--max-tokens", "64", "--context", "32"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"quantfleet: error: {damaged}: {name} is missing"), err
    assert "group_1" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
