"""Fixtures for evaluation tests: tiny Llamas that have a real tokenizer, MiniLM, a local Ray."""

from __future__ import annotations

import os
import shutil
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flows.cli import bundled_model_path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def save_tiny_llama(path: Path, seed: int = 0, **config: object) -> Path:
    """A small Llama in several shards, with MiniLM's tokenizer (30,522 tokens) beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings: dict[str, object] = dict(
        vocab_size=30522, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.08, bos_token_id=101, eos_token_id=102,
        pad_token_id=0,
    )
    settings.update(config)
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4MB")
    for name in _TOKENIZER_FILES:
        shutil.copy(Path(bundled_model_path()) / name, path / name)
    return path


def save_smol_llama(path: Path, seed: int = 0) -> Path:
    """A SmolLM2-shaped Llama (hidden 576, MLP 1536, tied embeddings), two layers, with a
    character-level tokenizer of 103 tokens, so its vocabulary (and its logits) stay small.

    576 is not a multiple of 128: int schemes store the 576-wide projections with group 64 and the
    1536-wide down_proj with group 128, in separate config groups.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(set(string.printable)):
        vocab.setdefault(char, len(vocab))
    characters = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    characters.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=characters, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="2MB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_smol_llama(tmp_path_factory.mktemp("smol-llama"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def minilm() -> str:
    return bundled_model_path()


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()
