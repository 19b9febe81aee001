"""The synthetic checkpoint backend: valid headers, the published sizes, bytes that agree however
they are read, realistic values, the cost model, and one-line errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from infra.errors import AccessDenied, InvalidURI, ObjectNotFound
from infra.safetensors import TensorReader, build_catalog, read_header
from infra.storage import open_storage
from infra.storage.synthetic import SyntheticStorage

SMALL = ("hidden=256&intermediate=512&moe_intermediate=128&experts=4&heads=2&q_lora_rank=128"
         "&kv_lora_rank=128&qk_nope_head_dim=64&qk_rope_head_dim=64&v_head_dim=64&vocab=512&layers=3")


@pytest.mark.parametrize("preset", ["kimi-k2", "kimi-k2-bf16", "llama-405b"])
def test_small_layouts_pass_strict_validation(preset):
    store = open_storage(f"synthetic://{preset}?{SMALL}&kv_heads=2&head_dim=64")
    catalog = build_catalog(store)  # reads every header strictly and cross-checks the index
    assert len(catalog.files) == 3
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(catalog.tensors)
    assert json.loads(store.read_bytes("config.json"))["num_hidden_layers"] == 3
    assert catalog.side_files == ("config.json",)


def test_published_sizes():
    """Kimi-K2: ~1.03T parameters (bf16 bytes / 2), block-FP8 as published; Llama: ~405B."""
    bf16 = json.loads(open_storage("synthetic://kimi-k2-bf16").read_bytes("model.safetensors.index.json"))
    params = bf16["metadata"]["total_size"] / 2
    assert 1.02e12 < params < 1.04e12
    fp8 = open_storage("synthetic://kimi-k2")
    config = json.loads(fp8.read_bytes("config.json"))
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["n_routed_experts"] == 384 and config["first_k_dense_replace"] == 1
    header = read_header(fp8, "model-00002-of-00061.safetensors")
    expert = header.tensor("model.layers.1.mlp.experts.383.down_proj.weight")
    scale = header.tensor("model.layers.1.mlp.experts.383.down_proj.weight_scale_inv")
    assert (expert.dtype, expert.shape) == ("F8_E4M3", (7168, 2048))
    assert (scale.dtype, scale.shape) == ("F32", (56, 16))
    assert header.tensor("model.layers.1.mlp.shared_experts.up_proj.weight").shape == (2048, 7168)
    llama = json.loads(open_storage("synthetic://llama-405b").read_bytes("model.safetensors.index.json"))
    assert 4.0e11 < llama["metadata"]["total_size"] / 2 < 4.1e11


def test_reads_agree_whole_ranged_and_across_instances():
    uri = f"synthetic://kimi-k2?{SMALL}"
    one, two = open_storage(uri), open_storage(uri)
    key = "model-00002-of-00003.safetensors"
    whole = one.read_bytes(key)
    assert two.read_bytes(key) == whole
    rng = np.random.default_rng(0)
    for _ in range(50):  # odd offsets and lengths, across the header and tensor boundaries
        start = int(rng.integers(0, len(whole) - 1))
        length = int(rng.integers(1, min(300_000, len(whole) - start) + 1))
        assert two.read_range(key, start, length) == whole[start : start + length]
    other_seed = open_storage(uri + "&seed=1").read_bytes(key)
    assert other_seed[:100] == whole[:100] and other_seed != whole  # same header, other values


def test_values_are_realistic():
    store = open_storage(f"synthetic://kimi-k2?{SMALL}")
    catalog = build_catalog(store)
    with TensorReader(store) as reader:
        def get(name: str) -> torch.Tensor:
            entry = catalog.tensors[name]
            return reader.read(entry.file, entry.info)

        codes = get("model.layers.1.mlp.experts.0.gate_proj.weight")
        scale = get("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv")
        embed = get("model.embed_tokens.weight").float()
        norm = get("model.layers.1.input_layernorm.weight").float()
    raw = codes.view(torch.uint8)
    assert not ((raw == 0x7F) | (raw == 0xFF)).any()  # no NaN codes
    assert torch.isfinite(codes.float()).all() and (scale > 0).all()
    real = codes.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: codes.shape[0]]
    assert 0.015 < real.std().item() < 0.025
    assert torch.isfinite(embed).all() and 0.018 < embed.std().item() < 0.022 and abs(embed.mean()) < 1e-3
    assert 0.95 < norm.mean().item() < 1.05


def test_cost_model_paces_reads():
    fast = open_storage(f"synthetic://kimi-k2-bf16?{SMALL}")
    slow = open_storage(f"synthetic://kimi-k2-bf16?{SMALL}&latency_ms=30&node_mbps=10")
    key = "model-00001-of-00003.safetensors"
    assert fast.stat(key) == slow.stat(key)  # the cost model is not part of the checkpoint
    started = time.monotonic()
    assert slow.read_range(key, 0, 1_000_000) == fast.read_range(key, 0, 1_000_000)
    assert time.monotonic() - started >= 0.1  # 1 MB at 10 MB/s, plus 30 ms of latency


def test_errors_are_one_clear_line():
    with pytest.raises(InvalidURI, match="unknown synthetic model 'gpt-9'"):
        open_storage("synthetic://gpt-9")
    with pytest.raises(InvalidURI, match="layers"):
        open_storage("synthetic://kimi-k2?layers=0")
    with pytest.raises(InvalidURI, match="wheels"):
        open_storage("synthetic://kimi-k2?wheels=4")
    store = open_storage(f"synthetic://kimi-k2?{SMALL}")
    assert isinstance(store, SyntheticStorage)
    with pytest.raises(ObjectNotFound, match="model-00009-of-00003"):
        store.stat("model-00009-of-00003.safetensors")
    with pytest.raises(AccessDenied, match="read-only"):
        store.put_bytes("config.json", b"{}")
    assert SyntheticStorage.from_uri(store.uri()).uri() == store.uri()  # the URI round-trips
