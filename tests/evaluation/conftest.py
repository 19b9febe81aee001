"""Fixtures for evaluation tests: a tiny Llama that has a real tokenizer, MiniLM, a local Ray."""

from __future__ import annotations

import os
import shutil
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
