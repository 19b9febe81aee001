"""Model-level evaluation: a model against itself, against a damaged copy, encoders, the text."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.cli import main
from workers.evaluation import EvaluationError
from workers.evaluation.evaluate import evaluate
from workers.evaluation.measures import CausalAccumulator, token_kl
from workers.evaluation.text import DEFAULT_TEXT_SHA256, load_text

TOKENS = 1024


def test_token_kl_is_zero_for_equal_logits_and_matches_torch() -> None:
    a = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0))
    b = a + 0.3 * torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(token_kl(a, a), torch.zeros(3, 5))
    reference = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                           reduction="none").sum(-1)
    assert torch.allclose(token_kl(a, b), reference, atol=1e-6)


def test_causal_accumulator_scores_next_tokens() -> None:
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # predicts the next token with certainty
    logits[0, 2, 0] = 0.0
    acc = CausalAccumulator()
    acc.add(logits, logits, ids, first=0)
    summary = acc.summary()
    assert summary["mean_kl"] == 0.0 and summary["top1"] == 1.0
    assert math.isclose(summary["ppl_original"], 1.0, rel_tol=1e-6)
    assert summary["scored_tokens"] == 3


def test_the_builtin_text_is_fixed_and_long_enough(minilm) -> None:
    from transformers import AutoTokenizer

    text = load_text()
    assert text.sha256 == DEFAULT_TEXT_SHA256
    assert hashlib.sha256(text.text.encode()).hexdigest() == DEFAULT_TEXT_SHA256
    assert text.text.startswith("Execution model\n")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    ids = tokenizer(text.text, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(ids) >= 8000


def test_a_model_against_itself_has_zero_kl_and_full_agreement(tiny_llama) -> None:
    result = evaluate(str(tiny_llama), str(tiny_llama), max_tokens=TOKENS, context=256)
    assert result.kind == "causal-lm" and result.tokens == TOKENS
    assert result.mean_kl == 0.0 and result.p99_kl == 0.0 and result.top1 == 1.0
    assert result.ppl_original == result.ppl_quantized and math.isfinite(result.ppl_original)
    assert result.tokens_per_s > 0


def test_a_damaged_weight_raises_kl(tiny_llama, tmp_path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_llama, damaged)
    name = "model.layers.0.mlp.down_proj.weight"
    index = json.loads((damaged / "model.safetensors.index.json").read_text())
    shard = damaged / index["weight_map"][name]
    tensors = load_file(shard)
    noise = torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(0))
    tensors[name] = (tensors[name].float() + 0.5 * noise).to(torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    result = evaluate(str(tiny_llama), str(damaged), max_tokens=TOKENS, context=256)
    assert result.mean_kl is not None and result.mean_kl > 1e-4
    assert result.p99_kl >= result.mean_kl and result.top1 < 1.0


def test_an_encoder_gets_cosine_figures(minilm) -> None:
    result = evaluate(minilm, minilm, max_tokens=512, context=128)
    assert result.kind == "encoder" and result.mean_kl is None
    assert result.embedding_cosine == pytest.approx(1.0, abs=1e-5)
    assert result.hidden_cosine_p1 == pytest.approx(1.0, abs=1e-5)


def test_a_text_file_is_used_and_a_missing_one_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("the quick brown fox jumps over the lazy dog " * 20)
    loaded = load_text(str(path))
    assert loaded.name == "notes.txt" and loaded.text.startswith("the quick")
    with pytest.raises(EvaluationError, match="cannot read the evaluation text"):
        load_text(str(tmp_path / "missing.txt"))


def test_cli_evaluate_prints_a_table_and_writes_json(tiny_llama, tmp_path, capsys) -> None:
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tiny_llama), str(tiny_llama), "--max-tokens", "256",
                 "--context", "128", "--json", str(out)]) == 0
    assert "mean KL divergence" in capsys.readouterr().out
    assert json.loads(out.read_text())["top1"] == 1.0


def test_cli_evaluate_user_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["evaluate", str(tmp_path / "nope"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantfleet: error:") and err.count("\n") == 1


def test_an_encoder_against_a_causal_lm_is_one_line(minilm, tiny_llama, capsys) -> None:
    assert main(["evaluate", minilm, str(tiny_llama)]) == 2
    err = capsys.readouterr().err
    assert err == f"quantfleet: error: {minilm} is an encoder but {tiny_llama} is not\n"
    assert main(["evaluate", str(tiny_llama), minilm]) == 2
    assert capsys.readouterr().err == f"quantfleet: error: {tiny_llama} is a causal LM but {minilm} is not\n"


def test_checkpoints_without_tokenizer_files_are_named(tmp_path, capsys) -> None:
    # From a Qwen2 config with no tokenizer files, transformers builds an empty tokenizer (one
    # token) instead of failing; the error must say what is missing, not that the text is short.
    from tests.flows.conftest import save_tiny_model

    bare = save_tiny_model("qwen", tmp_path / "bare")
    assert main(["evaluate", str(bare), str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantfleet: error: no tokenizer in either checkpoint"), err
    assert "no tokenizer files" in err and err.count("\n") == 1, err
