"""gpt-oss MXFP4 sources: `*_blocks`/`*_scales` experts, dequantized on the fly, kept fused.

The source is a tiny transformers gpt-oss whose fused experts are saved as OpenAI publishes them
(uint8 `gate_up_proj_blocks` [E, 2I, H/32, 16] and E8M0 `gate_up_proj_scales` [E, 2I, H/32], the
scales in another file of the index, `quant_method: mxfp4`), encoded here independently of
quantfleet. Its bf16 twin holds the experts as transformers' own MXFP4 loader dequantizes them
(`convert_moe_packed_tensors`): the reference every conversion is checked against.

transformers 5.x loads gpt-oss experts only fused (it has no per-expert names for this
architecture), so the output keeps them fused, dense in the model's dtype; the target scheme
applies to the 2-D Linears.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flows.cli import main
from flows.pipeline import SourceError, plan_conversion
from flows.recipe import Recipe
from tests.sources.builders import run_plain

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
EXPERTS = ("gate_up_proj", "down_proj")


def mxfp4_encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) -> uint8 blocks (..., C/32, 16), low nibble first, and E8M0 scales (..., C/32):
    the OCP MX rule, shared exponent floor(log2(amax)) - 2, values rounded to the nearest E2M1."""
    groups = weight.float().reshape(*weight.shape[:-1], weight.shape[-1] // 32, 32)
    amax = groups.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2,
                           torch.full_like(amax, -127)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    index = (scaled.abs().clamp(max=6.0).unsqueeze(-1) - _E2M1).abs().argmin(-1)
    codes = (index | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def save_gpt_oss_mxfp4(root: Path) -> tuple[Path, Path]:
    """A 2-layer gpt-oss (4 experts) saved as an MXFP4 source, and its dequantized bf16 twin."""
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=256, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    )
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # an expert that never trained: every weight zero, scales E8M0 2^-127
        model.model.layers[0].mlp.experts.gate_up_proj[3].zero_()
    source, twin = root / "mxfp4", root / "bf16"
    model.save_pretrained(twin)
    dense = load_file(twin / "model.safetensors")
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if name.endswith(tuple(f"experts.{p}" for p in EXPERTS)):
            # Stored as the checkpoint has it: (E, out, in), i.e. transformers' parameter transposed.
            blocks, exponents = mxfp4_encode(tensor.transpose(1, 2))
            weights[f"{name}_blocks"], scales[f"{name}_scales"] = blocks, exponents
            dense[name] = convert_moe_packed_tensors(blocks, exponents, dtype=torch.bfloat16)
        else:
            weights[name] = tensor
    save_file(dense, twin / "model.safetensors", metadata={"format": "pt"})
    source.mkdir()
    save_file(weights, source / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(scales, source / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in weights}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in scales})
    index = {"metadata": {}, "weight_map": weight_map}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    config_json = json.loads((twin / "config.json").read_text())
    config_json["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    (source / "config.json").write_text(json.dumps(config_json, indent=2))
    (source / "generation_config.json").write_bytes((twin / "generation_config.json").read_bytes())
    return source, twin


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt-oss"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    return out


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return model(ids).logits.float()


# (target, bound on the mean |logit difference| relative to the dequantized source's mean |logit|).
# The experts are the dequantized source exactly, so only attention's quantization moves logits
# (measured on this model: W4A16 0.17, W8A16 0.012, FP8 0.036, NVFP4A16 0.15; 4-bit with one group
# per 128-wide row of random weights is coarse).
TARGETS = [("W4A16", 0.25), ("W8A16", 0.03), ("FP8", 0.08), ("NVFP4A16", 0.25)]


def test_mxfp4_source_converts_to_each_target_and_loads(gpt_oss, tmp_path) -> None:
    source, twin = gpt_oss
    reference = _tensors(twin)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(twin, ids)
    for target, bound in TARGETS:
        out = tmp_path / target
        plan = run_plain(str(source), str(out), target)
        assert plan.source is not None and plan.source.format == "MXFP4 blocks (gpt-oss)"
        stored = _tensors(out)
        assert not [n for n in stored if n.endswith(("_blocks", "_scales"))]
        for layer in range(2):
            for proj in EXPERTS:
                name = f"model.layers.{layer}.mlp.experts.{proj}"
                # Kept fused, in transformers' layout: the very bf16 transformers' own loader makes.
                assert torch.equal(stored[name], reference[name]), (target, name)
            assert f"model.layers.{layer}.self_attn.q_proj.weight_scale" in stored
            assert stored[f"model.layers.{layer}.mlp.router.weight"].dtype == torch.bfloat16
        manifest = json.loads((out / "quantfleet.json").read_text())
        assert manifest["source"]["reference"] == "dequantized quantized source"
        labels = {t["source"] for t in manifest["tensors"] if t["source"]}
        assert labels == {"MXFP4 blocks (gpt-oss), dequantized"}
        got = _logits(out, ids)
        assert torch.isfinite(got).all()
        error = float((got - want).abs().mean() / want.abs().mean())
        print(f"{target}: mean relative logit difference {error:.4f}")
        assert error <= bound, (target, error)


def test_bf16_gpt_oss_keeps_its_fused_experts_and_matches_the_mxfp4_conversion(gpt_oss, tmp_path) -> None:
    source, twin = gpt_oss
    plan = run_plain(str(twin), str(tmp_path / "from-bf16"), "W4A16")
    assert plan.source is None  # nothing split, nothing dequantized
    run_plain(str(source), str(tmp_path / "from-mxfp4"), "W4A16")

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors")}

    assert digests(tmp_path / "from-bf16") == digests(tmp_path / "from-mxfp4")


def test_plan_shows_the_mxfp4_source_and_its_fused_experts(gpt_oss, capsys) -> None:
    source, _ = gpt_oss
    assert main(["plan", str(source), "--scheme", "W4A16"]) == 0
    out = capsys.readouterr().out
    assert "source: MXFP4 blocks (gpt-oss)" in out
    assert "4 quantized (4 MXFP4 blocks (gpt-oss))" in out and "4 dequantized to BF16" in out
    assert "4 fused expert tensors kept fused" in out


def _broken(source: Path, dest: Path, edit) -> Path:  # noqa: ANN001
    dest.mkdir()
    for path in source.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    scales_file = dest / "model-00002-of-00002.safetensors"
    scales = load_file(scales_file)
    edit(scales)
    save_file(scales, scales_file, metadata={"format": "pt"})
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != scales_file.name}
    index["weight_map"].update({k: scales_file.name for k in scales})
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


BLOCKS = "model.layers.1.mlp.experts.down_proj_blocks"
SCALES = "model.layers.1.mlp.experts.down_proj_scales"


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda s: s.pop(SCALES), f"{BLOCKS} (in model-00001-of-00002.safetensors): MXFP4 blocks without their "
                              f"scales {SCALES} (expected uint8 of shape [4, 128, 2]"),
    (lambda s: s.update({SCALES: s[SCALES][:, :, :1].contiguous()}),
     f"{SCALES} (in model-00002-of-00002.safetensors): U8 of shape [4, 128, 1], expected uint8 of shape "
     "[4, 128, 2]"),
])
def test_a_bad_mxfp4_source_is_refused_with_one_line(gpt_oss, tmp_path, capsys, edit, expected) -> None:
    import sys

    # Whether the refusal started Ray can only be seen when no earlier test of the session did.
    ray_before = sys.modules.get("ray")
    ray_was_running = ray_before is not None and ray_before.is_initialized()
    broken = _broken(gpt_oss[0], tmp_path / "broken", edit)
    with pytest.raises(SourceError):
        plan_conversion(str(broken), Recipe.preset("W4A16"))
    for mode in (["--no-prefect"], []):  # the default Prefect mode too
        dest = tmp_path / f"dest{len(mode)}"
        assert main(["convert", str(broken), str(dest), "--scheme", "W4A16", *mode]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("quantfleet: error: ") and expected in err[0], (mode, err)
        assert not dest.exists() or not [p for p in dest.rglob("*") if p.is_file()]  # nothing written
    ray = sys.modules.get("ray")
    assert ray_was_running or ray is None or not ray.is_initialized()  # a refusal starts no Ray


def test_evaluate_loads_the_mxfp4_source_as_its_dequantized_twin(gpt_oss) -> None:
    from transformers import AutoModelForCausalLM

    from flows.source_eval import source_model
    from workers.evaluation.source_model import load_source_dequantized

    source, twin = gpt_oss
    reading = source_model(str(source))
    assert reading is not None
    assert reading.reference() == "dequantized quantized source (MXFP4 blocks (gpt-oss))"
    model = load_source_dequantized(source, reading, causal=True, dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense(ids).logits)
