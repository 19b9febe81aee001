"""The model-level evaluation of GGUF output (workers/evaluation/gguf_model.py).

- `format: gguf` with `evaluate:` runs the evaluation on the staged splits before publishing: the
  report and manifest carry it, and a model gate below it keeps the result in staging.
- The model the evaluation loads from a GGUF is the one llama.cpp runs: its next-token
  distribution is far closer to llama.cpp's on the same file than the original's is (names,
  expert slices and the Q/K row order all undone correctly).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.gates import QualityGateFailed
from flows.pipeline import run_conversion
from flows.recipe import Recipe
from infra.publish import DEFAULT_MARKER
from tests.gguf.models import save_gguf_source
from tests.llamacpp import llama_cpp_unavailable, logits

pytestmark = pytest.mark.usefixtures("local_ray")
EVALUATE = {"enabled": True, "max_tokens": 512, "context": 128}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gguf_source("llama", tmp_path_factory.mktemp("llama-eval"), layers=2)


@pytest.fixture(scope="module")
def evaluated(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("gguf-eval") / "out"
    summary = run_conversion(str(llama), str(dest), Recipe.preset("Q4_K_M", format="gguf", evaluate=EVALUATE),
                             shard_size=400_000)
    assert summary.evaluation is not None and summary.units >= 2
    return dest


def test_gguf_output_is_evaluated_before_publishing(evaluated: Path) -> None:
    manifest = json.loads((evaluated / "quantfleet.json").read_text())
    figures = manifest["evaluation"]
    assert figures["kind"] == "causal-lm" and 0 < figures["mean_kl"] < 0.1 and figures["tokens"] > 100
    assert "## Model evaluation against the original" in (evaluated / "report.md").read_text()


def test_a_model_gate_keeps_a_gguf_in_staging(llama: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    recipe = Recipe.preset("Q4_K_M", format="gguf", evaluate=EVALUATE, gates={"max_mean_kl": 1e-9})
    with pytest.raises(QualityGateFailed, match="max_mean_kl"):
        run_conversion(str(llama), str(dest), recipe, shard_size=400_000)
    assert not (dest / DEFAULT_MARKER).exists() and not list(dest.glob("*.gguf"))
    assert list((dest / ".staging").rglob("*.gguf"))


@pytest.mark.skipif(bool(llama_cpp_unavailable()), reason=llama_cpp_unavailable() or "-")
def test_the_evaluated_model_is_the_one_llama_cpp_runs(llama: Path, evaluated: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.evaluation.gguf_model import load_gguf_dequantized

    text = "The for statement is used to iterate over the elements of a sequence, such as a string"
    tokens = AutoTokenizer.from_pretrained(llama)(text)["input_ids"]
    first = sorted(evaluated.glob("*.gguf"))[0]
    theirs = torch.from_numpy(logits(first, tokens, context=128)).double()
    ours_model = load_gguf_dequantized(evaluated, llama, causal=True, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = ours_model(torch.tensor([tokens])).logits[0].double()
        reference = original(torch.tensor([tokens])).logits[0].double()

    def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
        p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    to_llama_cpp = kl(ours, theirs)
    original_to_llama_cpp = kl(reference, theirs)
    print(f"KL to llama.cpp: evaluated model {to_llama_cpp:.3g}, original {original_to_llama_cpp:.3g}")
    assert np.isfinite(to_llama_cpp) and to_llama_cpp < 0.2 * original_to_llama_cpp, (
        to_llama_cpp, original_to_llama_cpp)
