"""SentencePiece-style tokenizers (Llama 2, Mistral) as llama.cpp's `llama` tokenizer model.

A small transformers-built Mistral and a Llama 2, each with a SentencePiece-style tokenizer.json
(BPE with byte fallback, `<0xNN>` byte pieces, `▁` spaces: Mistral's with a Metaspace
pre-tokenizer, Llama 2's with the Prepend/Replace normalizer; tests/gguf/models.py) are converted
to GGUF; a real llama.cpp
(tests/llamacpp.py) must tokenize text, bytes outside the vocabulary included, to the very ids
transformers gives, compute the original's logits from the F16 output, and generate from the
Q4_K_M output the whole pipeline writes. The scores derived from the merges are checked on their
own, as are a Unigram tokenizer's.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from flows.pipeline import plan_conversion, run_conversion
from flows.recipe import Recipe
from infra.gguf.spm import add_space_prefix, sentencepiece_vocab
from infra.storage import open_storage
from tests.gguf.models import MISTRAL_CHAT_TEMPLATE, save_gguf_source
from tests.llamacpp import llama_cpp, llama_cpp_unavailable, logits

needs_llama_cpp = pytest.mark.skipif(bool(llama_cpp_unavailable()), reason=llama_cpp_unavailable() or "-")

# Characters the training text never has (é, ü, ï, →) take the byte pieces.
SENTENCES = [
    "The for statement iterates over the elements of a sequence",
    "café ünïcode → bytes",
    "def f(x):\n    return x + 1\n",
    "Hello world",
]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gguf_source("mistral", tmp_path_factory.mktemp("mistral"), dtype=torch.float16)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gguf_source("llama2", tmp_path_factory.mktemp("llama2"), dtype=torch.float16)


def _f16_splits(source: Path, folder: Path) -> list[Path]:
    from flows.gguf_output.plan import gguf_context
    from workers.gguf_unit import convert_gguf_unit

    plan = plan_conversion(str(source), Recipe.preset("F16", format="gguf"), shard_size=1_000_000)
    folder.mkdir()
    ctx = gguf_context(plan, open_storage(str(folder)).uri(), "cpu")
    return [folder / convert_gguf_unit(unit, ctx).file_name for unit in plan.units]


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["mistral", "llama2"])
def test_tokenizes_as_transformers_and_gives_the_original_logits(kind, request, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = request.getfixturevalue(kind)
    splits = _f16_splits(source, tmp_path / "f16")
    assert len(splits) >= 2
    fields = gguf.GGUFReader(str(splits[0])).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert fields["tokenizer.chat_template"].contents() == MISTRAL_CHAT_TEMPLATE
    ids = [fields[f"tokenizer.ggml.{kind}_token_id"].contents() for kind in ("bos", "eos", "unknown")]
    assert ids == [1, 2, 0]
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.pre" not in fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.UNKNOWN
    assert types[1] == types[2] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL

    hf = AutoTokenizer.from_pretrained(source)
    model = llama_cpp().Llama(str(splits[0]), n_ctx=128, n_threads=2)
    try:
        # No text starting with a space: transformers' Metaspace adds no `▁` before one, llama.cpp
        # (like sentencepiece) always does; and transformers 5's LlamaTokenizer runs a Metaspace
        # even for Llama 2's Prepend/Replace normalizer.
        for text in SENTENCES:
            expected = hf(text)["input_ids"]
            assert model.tokenize(text, add_special=True) == expected, text
        assert any(types[i] == gguf.TokenType.BYTE for i in hf(SENTENCES[1])["input_ids"])
    finally:
        model.close()

    ids = hf(SENTENCES[0] + ". " + SENTENCES[2])["input_ids"]
    ours = logits(splits[0], ids, context=128)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(
            torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - reference).max() < 0.02 * reference.std()  # measured ~1e-3 of std ~0.3


@needs_llama_cpp
def test_mistral_q4_k_m_pipeline_output_generates(local_ray, mistral, tmp_path) -> None:
    dest = tmp_path / "out"
    run_conversion(str(mistral), str(dest), Recipe.preset("Q4_K_M", format="gguf"), shard_size=400_000)
    splits = sorted(dest.glob("*.gguf"))
    assert len(splits) >= 2
    model = llama_cpp().Llama(str(splits[0]), n_ctx=128, n_threads=2)
    try:
        assert model.n_layer == 2 and model.n_vocab == 1024
        assert model.generate("The for statement", max_tokens=4, temperature=0.0, seed=0)
    finally:
        model.close()


def test_bpe_scores_follow_the_merge_order_and_unigram_scores_are_kept() -> None:
    bpe = {
        "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>",
                  "vocab": {"<unk>": 0, "<s>": 1, "<0x41>": 2, "a": 3, "b": 4, "\u2581": 5, "ab": 6,
                            "\u2581ab": 7},
                  "merges": [["a", "b"], "\u2581 ab"]},
        "added_tokens": [{"id": 1, "content": "<s>", "special": True},
                         {"id": 8, "content": "<tool>", "special": False}],
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"},
    }
    vocab = sentencepiece_vocab(bpe, 10, "tokenizer.json")
    assert vocab.tokens[:9] == ["<unk>", "<s>", "<0x41>", "a", "b", "\u2581", "ab", "\u2581ab", "<tool>"]
    assert vocab.tokens[9] == "[PAD9]" and vocab.scores[9] == -1000.0
    assert vocab.scores[6] > vocab.scores[7]  # the first merge wins llama.cpp's highest-score join
    T = gguf.TokenType
    assert vocab.types == [T.UNKNOWN, T.CONTROL, T.BYTE, T.NORMAL, T.NORMAL, T.NORMAL, T.NORMAL, T.NORMAL,
                           T.USER_DEFINED, T.UNUSED]
    assert add_space_prefix(bpe)
    assert not add_space_prefix({**bpe, "pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never"}})
    legacy = {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}}
    assert add_space_prefix(legacy)

    unigram = {"model": {"type": "Unigram", "unk_id": 0, "byte_fallback": True,
                         "vocab": [["<unk>", 0.0], ["\u2581the", -2.5], ["<0x0A>", 0.0]]}}
    vocab = sentencepiece_vocab(unigram, 3, "tokenizer.json")
    assert vocab.scores == [0.0, -2.5, 0.0] and vocab.types == [T.UNKNOWN, T.NORMAL, T.BYTE]
