"""Which file names count as a tokenizer for the check before an evaluated conversion."""

from __future__ import annotations

import pytest

from flows.eval_inputs import is_tokenizer_file


@pytest.mark.parametrize("key", ["tokenizer.json", "m/tokenizer.model", "vocab.txt", "vocab.json",
                                 "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tiktoken.model",
                                 "qwen.tiktoken"])
def test_tokenizer_files_of_common_families_count(key: str) -> None:
    assert is_tokenizer_file(key)


@pytest.mark.parametrize("key", ["tokenizer_config.json", "special_tokens_map.json", "config.json",
                                 "generation_config.json", "README.md", "modules.json"])
def test_configs_alone_are_no_tokenizer(key: str) -> None:
    assert not is_tokenizer_file(key)
