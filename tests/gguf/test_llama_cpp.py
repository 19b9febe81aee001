"""GGUF output checked by a real llama.cpp (tests/llamacpp.py: the prebuilt llama-cpp-py-sync wheel).

- A small transformers-built Llama converted by the whole pipeline (plan, Ray workers, staging,
  publish) to Q4_K_M in at least 3 splits loads in llama.cpp as one model, tokenizes as the Hugging
  Face tokenizer does, generates, and its next-token distribution stays close to the original's.
- Q8_0, Q4_K and Q6_K tensors quantfleet writes are byte-identical to what llama.cpp's own
  `llama_model_quantize` makes from the same f16 weights (our F16 GGUF as its input, `pure` so
  every weight gets the one type).
- An unsupported architecture, in the default (Prefect) mode, is one line and publishes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.pipeline import plan_conversion, run_conversion
from flows.recipe import Recipe
from infra.storage import open_storage
from tests.gguf.models import save_gguf_source, unsupported_copy
from tests.llamacpp import llama_cpp, llama_cpp_unavailable, logits, quantize_with_llama_cpp

pytestmark = pytest.mark.skipif(bool(llama_cpp_unavailable()), reason=llama_cpp_unavailable() or "-")

PROMPT = "The for statement is used to iterate over the elements of a sequence, such as a string"


@pytest.fixture(scope="module")
def llama_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """f16 weights, so llama.cpp's quantizer (which reads our F16 GGUF) sees the very same values."""
    return save_gguf_source("llama", tmp_path_factory.mktemp("llama-f16"), layers=3, dtype=torch.float16)


def _reference_logits(source: Path, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(reference).double(), -1)
    q = torch.log_softmax(torch.from_numpy(other).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_pipeline_gguf_splits_load_as_one_model_and_generate(local_ray, llama_f16, tmp_path) -> None:
    from transformers import AutoTokenizer

    dest = tmp_path / "out"
    recipe = Recipe.preset("Q4_K_M", format="gguf")
    summary = run_conversion(str(llama_f16), str(dest), recipe, shard_size=400_000)
    splits = sorted(p.name for p in dest.glob("*.gguf"))
    assert len(splits) >= 3 and splits[0] == f"model-00001-of-{len(splits):05d}.gguf"
    assert summary.units == len(splits)
    manifest = json.loads((dest / "quantfleet.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == splits
    assert not list(dest.glob("*.safetensors")) and not (dest / "config.json").exists()
    report = (dest / "report.md").read_text()
    assert "GGUF Q4_K_M" in report and "Q6_K" in report

    tokens = AutoTokenizer.from_pretrained(llama_f16)(PROMPT)["input_ids"]
    model = llama_cpp().Llama(str(dest / splits[0]), n_ctx=128, n_threads=2)
    try:
        assert model.n_layer == 3 and model.n_vocab == 1024
        assert model.tokenize(PROMPT, add_special=False) == tokens  # the GGUF vocabulary and merges
        assert model.generate("The for statement", max_tokens=4, temperature=0.0, seed=0)
    finally:
        model.close()
    # Loaded as one model: the distribution stays near the original's (measured ~2e-3; the exact
    # check of names, Q/K order and metadata is the F16 one below).
    ours = logits(dest / splits[0], tokens, context=128)
    assert _mean_kl(_reference_logits(llama_f16, tokens), ours) < 0.01

    from flows.versions import verify_uri

    assert all(report.ok for report in verify_uri(str(dest)))


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(str(path)).tensors}


def _write_gguf(source: Path, scheme: str, staging: Path) -> Path:
    """One split written by the GGUF worker itself (the pipeline's unit function, no Ray)."""
    from flows.gguf_output.plan import gguf_context
    from workers.gguf_unit import convert_gguf_unit

    plan = plan_conversion(str(source), Recipe.preset(scheme, format="gguf"), shard_size=1 << 40)
    assert len(plan.units) == 1
    folder = staging / scheme
    folder.mkdir()
    result = convert_gguf_unit(plan.units[0], gguf_context(plan, open_storage(str(folder)).uri(), "cpu"))
    return folder / result.file_name


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_f16_gguf_gives_the_original_logits(kind, llama_f16, tmp_path) -> None:
    """Names, Q/K row order (Llama), Q/K norms (Qwen3), RoPE and norm settings: with f16 weights
    llama.cpp must compute what transformers computes, up to float rounding (a wrong permutation
    or a missing norm moves logits by about their own size)."""
    from transformers import AutoTokenizer

    source = llama_f16 if kind == "llama" else save_gguf_source(kind, tmp_path / kind, dtype=torch.float16)
    tokens = AutoTokenizer.from_pretrained(source)(PROMPT)["input_ids"]
    ours = logits(_write_gguf(source, "F16", tmp_path), tokens, context=128)
    reference = _reference_logits(source, tokens)
    assert np.abs(ours - reference).max() < 0.02 * reference.std()


@pytest.mark.slow  # ~30 s: four conversions and three llama.cpp quantizations
def test_q8_0_q4_k_q6_k_blocks_match_llama_model_quantize(llama_f16, tmp_path) -> None:
    f16 = _write_gguf(llama_f16, "F16", tmp_path)
    for scheme, ftype in (("Q8_0", "Q8_0"), ("Q4_K", "Q4_K_S"), ("Q6_K", "Q6_K")):
        ours = _tensors(_write_gguf(llama_f16, scheme, tmp_path))
        theirs_path = tmp_path / f"llama-cpp-{scheme}.gguf"
        quantize_with_llama_cpp(f16, theirs_path, ftype, pure=True)
        theirs = _tensors(theirs_path)
        assert ours.keys() == theirs.keys()
        weights = [name for name, (kind, _) in theirs.items() if kind != "F32"]
        assert len(weights) == 2 + 7 * 3  # embeddings, output and every layer's 7 projections
        for name in weights:
            assert ours[name][0] == theirs[name][0] == scheme, name
            assert ours[name][1] == theirs[name][1], f"{scheme}: {name} differs from llama.cpp's bytes"


def test_unsupported_architecture_is_one_line_and_publishes_nothing(llama_f16, tmp_path) -> None:
    from tests.flows.test_cli import run_cli

    source = unsupported_copy(llama_f16, tmp_path / "falcon")
    dest = tmp_path / "out"
    # The default (Prefect) mode, as a user runs it.
    done = run_cli("convert", str(source), str(dest), "--format", "gguf", "--scheme", "Q4_K_M")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("quantfleet: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "architecture FalconForCausalLM cannot be written as GGUF; supported: LlamaForCausalLM" in lines[0]
    assert not dest.exists() or not any(dest.rglob("*"))
