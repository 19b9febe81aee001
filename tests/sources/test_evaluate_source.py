"""`quantfleet evaluate` against a quantized source compares with the dequantized source.

The block-FP8 source and its bf16 twin (the dequantized weights, computed independently) must give
the very same model-level figures against the same converted model: the evaluation runs the model
the source means, dequantized as the conversion's workers dequantize it, and says so.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from flows.cli import main
from flows.pipeline import plan_conversion
from flows.recipe import Recipe
from flows.source_eval import plan_source_model, source_model
from tests.sources.builders import run_plain, save_block_fp8, tiny_deepseek
from workers.evaluation.evaluate import evaluate


def _char_tokenizer(path: Path) -> None:
    """A character-level tokenizer of ~100 tokens: fits the tiny model's 256-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(set(string.printable)):
        vocab.setdefault(char, len(vocab))
    characters = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    characters.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=characters, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("eval-source")
    bf16 = tiny_deepseek(root / "bf16")
    _char_tokenizer(bf16)
    save_block_fp8(bf16, root / "fp8", root / "twin")
    for folder in (root / "fp8", root / "twin"):
        for file in bf16.glob("*token*"):
            (folder / file.name).write_bytes(file.read_bytes())
    run_plain(str(root / "fp8"), str(root / "w8"), "W8A16")
    return root / "fp8", root / "twin", root / "w8"


def test_evaluate_runs_the_dequantized_source_and_says_so(converted, tmp_path, capsys) -> None:
    fp8, twin, w8 = converted
    source = source_model(str(fp8))
    assert source is not None and source.format == "block-FP8 128x128"
    options = {"max_tokens": 96, "context": 48, "device": "cpu"}
    against_source = evaluate(str(fp8), str(w8), original_source=source, **options)  # type: ignore[arg-type]
    against_twin = evaluate(str(twin), str(w8), **options)  # type: ignore[arg-type]
    assert against_source.figures() == against_twin.figures()
    assert against_source.mean_kl is not None and against_source.mean_kl > 0  # W8A16 is not exact
    assert against_source.reference == "dequantized quantized source (block-FP8 128x128)"
    assert against_twin.reference is None and source_model(str(twin)) is None
    # The same from the command line, in the table and the JSON.
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(fp8), str(w8), "--max-tokens", "96", "--context", "48", "--device", "cpu",
                 "--json", str(report)]) == 0
    assert "dequantized quantized source (block-FP8 128x128)" in capsys.readouterr().out
    assert json.loads(report.read_text())["mean_kl"] == against_twin.mean_kl
    # What a conversion's own evaluation gets from its plan is the same reading of the source.
    from_plan = plan_source_model(plan_conversion(str(fp8), Recipe.preset("W8A16")))
    assert from_plan is not None and from_plan.format == source.format
    assert {j.name for j in from_plan.jobs} == {j.name for j in source.jobs}
