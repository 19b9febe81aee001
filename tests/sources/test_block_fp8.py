"""Block-FP8 sources (DeepSeek/Kimi style) are dequantized on the fly, or carried over exactly.

The source is a tiny transformers DeepSeek-V3 saved as DeepSeek publishes it (E4M3 weights, float32
`weight_scale_inv` per 128x128 tile, the scales in another file of the index). Its bf16 twin holds
the dequantized weights (computed here independently). Converting the FP8 source must give the
very bytes converting the twin gives: the worker dequantizes exactly, in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flows.cli import main
from flows.pipeline import SourceError, plan_conversion
from flows.recipe import Recipe
from tests.sources.builders import dequantized_logits, run_plain, save_block_fp8, tiny_deepseek


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8")
    bf16 = tiny_deepseek(root / "bf16")
    save_block_fp8(bf16, root / "fp8", root / "reference")
    return root / "fp8", root / "reference"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    return out


def _shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def test_w4a16_from_block_fp8_equals_w4a16_from_its_dequantized_twin(sources, tmp_path) -> None:
    fp8, reference = sources
    run_plain(str(fp8), str(tmp_path / "from-fp8"), "W4A16")
    run_plain(str(reference), str(tmp_path / "from-bf16"), "W4A16")
    assert _shard_digests(tmp_path / "from-fp8") == _shard_digests(tmp_path / "from-bf16")
    out = _tensors(tmp_path / "from-fp8")
    assert not [n for n in out if n.endswith("_scale_inv")] and not [t for t in out.values()
                                                                     if t.dtype == torch.float8_e4m3fn]
    config = json.loads((tmp_path / "from-fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    manifest = json.loads((tmp_path / "from-fp8" / "quantfleet.json").read_text())
    assert manifest["source"]["format"] == "block-FP8 128x128"
    assert manifest["source"]["reference"] == "dequantized quantized source"
    sources_seen = {t["source"] for t in manifest["tensors"] if t["source"]}
    assert sources_seen == {"block-FP8 128x128, dequantized"}
    # Loads in transformers; 4-bit random-weight logits stay within the bound stated here.
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    want, got = _logits(reference, ids), _logits(tmp_path / "from-fp8", ids)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 0.5 * want.abs().max()


def test_block_fp8_to_fp8_block_is_carried_over_bit_exact(sources, tmp_path) -> None:
    fp8, reference = sources
    run_plain(str(fp8), str(tmp_path / "out"), "FP8_BLOCK")
    source, out = _tensors(fp8), _tensors(tmp_path / "out")
    carried = [n for n, t in source.items() if t.dtype == torch.float8_e4m3fn]
    assert len(carried) > 20
    for name in carried:
        assert torch.equal(out[name].view(torch.uint8), source[name].view(torch.uint8)), name
        scale = out[name.removesuffix("weight") + "weight_scale"]
        assert scale.dtype == torch.float32 and torch.equal(scale, source[f"{name}_scale_inv"]), name
    assert not [n for n in out if n.endswith("_scale_inv")]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "carried over, exact" in report
    # transformers 5.23 cannot load FP8 tile scales into fused experts (its CompressedTensorsDequantize
    # multiplies without expanding the tiles), so the loading check keeps the routed experts dense:
    # they are dequantized to bf16, everything else is carried over.
    run_plain(str(fp8), str(tmp_path / "loadable"), "FP8_BLOCK", ignore=["re:.*mlp\\.experts\\..*"])
    dense_experts = _tensors(tmp_path / "loadable")
    expert = "model.layers.1.mlp.experts.2.up_proj.weight"
    assert dense_experts[expert].dtype == torch.bfloat16
    assert torch.equal(dense_experts[expert], _tensors(reference)[expert])
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    want, got = _logits(reference, ids), _logits(tmp_path / "loadable", ids)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_plan_shows_source_format_and_what_is_dequantized(sources, capsys) -> None:
    fp8, _ = sources
    assert main(["plan", str(fp8), "--scheme", "W8A16"]) == 0
    out = capsys.readouterr().out
    assert "source: block-FP8 128x128" in out
    assert "dequantized and re-quantized" in out and "0 carried over, exact" in out
    assert main(["plan", str(fp8), "--scheme", "FP8_BLOCK"]) == 0
    assert " 0 carried over" not in capsys.readouterr().out


def _broken_copy(fp8: Path, dest: Path, edit) -> Path:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    for path in fp8.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    scales_file = dest / "model-00002-of-00002.safetensors"
    scales = load_file(scales_file)
    edit(scales, dest)
    save_file(scales, scales_file, metadata={"format": "pt"})
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    second = "model-00002-of-00002.safetensors"
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != second}
    index["weight_map"].update({k: second for k in scales})
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


NAME = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"


def _drop(scales: dict, dest: Path) -> None:
    del scales[f"{NAME}_scale_inv"]


def _reshape(scales: dict, dest: Path) -> None:
    scales[f"{NAME}_scale_inv"] = scales[f"{NAME}_scale_inv"][:1]


def _unknown(scales: dict, dest: Path) -> None:
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (dest / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("edit", "expected"), [
    (_drop, f"{NAME} (in model-00001-of-00002.safetensors): float8_e4m3fn weight without its scale "
            f"{NAME}_scale_inv (expected float32 of shape [2, 2]"),
    (_reshape, f"{NAME}_scale_inv (in model-00002-of-00002.safetensors): F32 of shape [1, 2], expected "
               "float32 of shape [2, 2]"),
    (_unknown, "quant_method 'gptq', which quantfleet does not read"),
])
def test_a_bad_source_is_refused_with_one_line_and_nothing_published(sources, tmp_path, capsys, edit,
                                                                      expected) -> None:
    broken = _broken_copy(sources[0], tmp_path / "broken", edit)
    with pytest.raises(SourceError, match="quantfleet|expected"):
        plan_conversion(str(broken), Recipe.preset("W4A16"))
    # --no-prefect and the default Prefect mode alike: the plan refuses it before Ray or any flow
    # starts.
    for mode in (["--no-prefect"], []):
        dest = tmp_path / f"dest{len(mode)}"
        assert main(["convert", str(broken), str(dest), "--scheme", "W4A16", *mode]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("quantfleet: error: ") and expected in err[0], (mode, err)
        assert not dest.exists() or not [p for p in dest.rglob("*") if p.is_file()]  # nothing written


def test_a_nan_code_in_a_block_fp8_weight_is_refused_naming_the_tensor(sources, tmp_path, capsys) -> None:
    # E4M3 has NaN codes (0x7F, 0xFF); one must not be read as a large finite weight and published.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"
    broken.mkdir()
    for path in sources[0].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    shard = broken / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    codes = tensors[NAME].view(torch.uint8).clone()
    codes[1, 2] = 0xFF
    tensors[NAME] = codes.view(torch.float8_e4m3fn)
    save_file(tensors, shard, metadata={"format": "pt"})
    for mode in (["--no-prefect"], []):
        dest = tmp_path / f"dest{len(mode)}"
        assert main(["convert", str(broken), str(dest), "--scheme", "W4A16", *mode]) == 2
        err = capsys.readouterr().err
        assert f"{NAME} (in model-00001-of-00002.safetensors): 1 non-finite value(s) (first: nan at row 1, " \
               "column 2)" in err, (mode, err)
        assert "Traceback" not in err and not (dest / "_QUANTFLEET_PUBLISHED.json").exists()


# (target, bound on the mean |logit difference| relative to the dequantized source's mean |logit|).
# Measured on this model (random weights, so 4-bit with one scale per 128 columns is coarse):
# W4A16 0.30, W8A16 0.023, FP8 (one scale per row) 0.087, NVFP4A16 0.27 (through our loader).
OTHER_TARGETS = [("W4A16", 0.4), ("W8A16", 0.05), ("FP8", 0.15), ("NVFP4A16", 0.35)]


def test_block_fp8_converts_to_the_other_targets(sources, tmp_path) -> None:
    fp8, reference = sources
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    want = _logits(reference, ids)
    for target, bound in OTHER_TARGETS:
        out = tmp_path / target
        run_plain(str(fp8), str(out), target)
        manifest = json.loads((out / "quantfleet.json").read_text())
        assert manifest["source"]["reference"] == "dequantized quantized source"
        # Every re-quantized weight against the dequantized source, measured on the workers.
        cosines = [t["cosine"] for t in manifest["tensors"] if t["scheme"] is not None]
        assert len(cosines) > 20 and min(cosines) >= 0.97, target
        assert not [n for n in _tensors(out) if n.endswith("_scale_inv")]
        got = (dequantized_logits if target == "NVFP4A16" else _logits)(out, ids)
        error = float((got - want).abs().mean() / want.abs().mean())
        print(f"{target}: mean relative logit difference {error:.4f}")
        assert torch.isfinite(got).all() and error <= bound, (target, error)
