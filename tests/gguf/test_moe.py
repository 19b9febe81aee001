"""Qwen3-MoE as GGUF, checked by a real llama.cpp (tests/llamacpp.py), from both expert layouts.

A small transformers-built Qwen3-MoE (8 experts, 2 per token) is saved per expert
(`mlp.experts.{e}.gate_proj.weight`, what transformers 5 writes) and fused
(`mlp.experts.gate_up_proj` [E, 2I, H], what it holds in memory). From either:

- the F16 GGUF, written over several units, loads as one model in llama.cpp and gives the
  logits transformers gives (experts stacked in the right order, router, expert metadata);
- the Q4_K_M GGUF, written by the whole pipeline over at least 2 units, has exactly the types and
  bytes llama.cpp's own `llama_model_quantize` gives from our F16 GGUF (its MoE rules: the
  8-expert bumps of attn_k/attn_v/attn_output, ffn_down by layer, the F32 router), and generates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.pipeline import plan_conversion, run_conversion
from flows.recipe import Recipe
from infra.storage import open_storage
from tests.gguf.models import fuse_experts, save_gguf_source
from tests.llamacpp import llama_cpp, llama_cpp_unavailable, logits, quantize_with_llama_cpp

pytestmark = pytest.mark.skipif(bool(llama_cpp_unavailable()), reason=llama_cpp_unavailable() or "-")

PROMPT = "The for statement is used to iterate over the elements of a sequence, such as a string"


@pytest.fixture(scope="module")
def moe_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same f16 weights in both layouts (f16: llama.cpp's quantizer reads our F16 GGUF)."""
    root = tmp_path_factory.mktemp("qwen3moe")
    per_expert = save_gguf_source("qwen3moe", root / "per-expert", dtype=torch.float16)
    fused = shutil.copytree(per_expert, root / "fused")
    fuse_experts(fused)
    return {"per-expert": per_expert, "fused": fused}


def _write_splits(source: Path, scheme: str, folder: Path, shard_size: int) -> list[Path]:
    """Every split of the plan, each written by the GGUF worker itself (no Ray)."""
    from flows.gguf_output.plan import gguf_context
    from workers.gguf_unit import convert_gguf_unit

    plan = plan_conversion(str(source), Recipe.preset(scheme, format="gguf"), shard_size=shard_size)
    folder.mkdir()
    ctx = gguf_context(plan, open_storage(str(folder)).uri(), "cpu")
    return [folder / convert_gguf_unit(unit, ctx).file_name for unit in plan.units]


def _tensors(paths: list[Path]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    from gguf import GGUFReader

    found = {}
    for path in paths:
        for t in GGUFReader(str(path)).tensors:
            found[t.name] = (t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes())
    return found


def _tokens(source: Path) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(source)(PROMPT)["input_ids"])


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_f16_moe_splits_give_the_original_logits(layout, moe_sources, tmp_path) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    source = moe_sources[layout]
    splits = _write_splits(source, "F16", tmp_path / "f16", shard_size=1_000_000)
    assert len(splits) >= 2
    tensors = _tensors(splits)
    # One 3-D tensor per layer and kind, [E, rows, columns] to llama.cpp (ne: columns, rows, E).
    assert tensors["blk.1.ffn_gate_exps.weight"][:2] == ("F16", (256, 256, 8))
    assert tensors["blk.1.ffn_down_exps.weight"][:2] == ("F16", (256, 256, 8))
    assert tensors["blk.0.ffn_gate_inp.weight"][:2] == ("F32", (256, 8))
    assert not any(".experts." in name for name in tensors)
    fields = GGUFReader(str(splits[0])).fields
    for key, value in (("expert_count", 8), ("expert_used_count", 2), ("expert_feed_forward_length", 256)):
        assert int(fields[f"qwen3moe.{key}"].parts[-1][0]) == value, key

    tokens = _tokens(source)
    ours = logits(splits[0], tokens, context=128)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].numpy()
    # Measured ~1e-3 of logits with std ~0.3; an expert out of order or unnormalised routing
    # weights move them by ~0.2.
    assert np.abs(ours - reference).max() < 0.02 * reference.std()

    # `evaluate` reads the splits back into the source's own layout, fused experts included.
    from workers.evaluation.gguf_model import load_gguf_dequantized

    restored = load_gguf_dequantized(tmp_path / "f16", source, causal=True, dtype=torch.float32).eval()
    with torch.no_grad():
        again = restored(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(again - reference).max() < 0.02 * reference.std()


def test_q4_k_m_moe_is_what_llama_quantize_makes_and_generates(local_ray, moe_sources, tmp_path) -> None:
    source = moe_sources["fused"]
    dest = tmp_path / "out"
    run_conversion(str(source), str(dest), Recipe.preset("Q4_K_M", format="gguf"), shard_size=1_000_000)
    splits = sorted(dest.glob("*.gguf"))
    assert len(splits) >= 2
    ours = _tensors(splits)

    (f16,) = _write_splits(moe_sources["per-expert"], "F16", tmp_path / "f16", shard_size=1 << 40)
    theirs_path = tmp_path / "llama-cpp-q4_k_m.gguf"
    quantize_with_llama_cpp(f16, theirs_path, "Q4_K_M")
    theirs = _tensors([theirs_path])
    assert ours.keys() == theirs.keys()
    for name, (kind, shape, data) in theirs.items():
        assert ours[name][:2] == (kind, shape), name
        assert ours[name][2] == data, f"{name} ({kind}) differs from llama.cpp's bytes"
    types = {name: kind for name, (kind, _, _) in theirs.items()}
    # The rules this model exercises (8 experts, 2 layers: only layer 1 gets more bits).
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_k.weight"] == "Q8_0"
    assert types["blk.0.attn_output.weight"] == "Q5_K"
    assert (types["blk.0.ffn_down_exps.weight"], types["blk.1.ffn_down_exps.weight"]) == ("Q4_K", "Q6_K")
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"

    model = llama_cpp().Llama(str(splits[0]), n_ctx=128, n_threads=2)
    try:
        assert model.n_layer == 2 and model.n_vocab == 1024
        assert model.tokenize(PROMPT, add_special=False) == _tokens(source)
        assert model.generate("The for statement", max_tokens=4, temperature=0.0, seed=0)
    finally:
        model.close()
