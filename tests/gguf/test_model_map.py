"""Hugging Face -> GGUF names, metadata, Q/K permutation and the Q4_K_M / Q5_K_M rule."""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers

from infra.errors import CheckpointError
from infra.gguf.model import (
    UnsupportedArchitectureError,
    check_config,
    family_for,
    hyper_parameters,
    map_tensor,
)
from quantizers.gguf.layout import llama_rope_permute
from quantizers.gguf.mixes import mix_type, use_more_bits


def _llama() -> tuple[dict, transformers.LlamaForCausalLM]:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    as_dict = config.to_dict()
    as_dict["architectures"] = ["LlamaForCausalLM"]
    return as_dict, model


def test_every_llama_tensor_gets_a_gguf_name_and_qk_are_permuted() -> None:
    config, model = _llama()
    family = family_for(config)
    targets = {name: map_tensor(name, config, family) for name in model.state_dict()}
    assert all(t is not None for t in targets.values())
    names = {t.name for t in targets.values() if t}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.7.ffn_down.weight"} <= names
    q = targets["model.layers.0.self_attn.q_proj.weight"]
    k = targets["model.layers.0.self_attn.k_proj.weight"]
    assert q and k and q.name == "blk.0.attn_q.weight" and (q.permute_heads, k.permute_heads) == (4, 2)
    assert targets["model.layers.0.mlp.up_proj.weight"].permute_heads is None  # type: ignore[union-attr]
    meta = hyper_parameters(config, family, "tiny")
    assert meta["llama.attention.head_count_kv"].value == 2
    assert meta["llama.rope.dimension_count"].value == 64
    assert meta[gguf.Keys.General.ARCHITECTURE].value == "llama"


def test_permutation_interleaves_the_halves_of_each_head() -> None:
    weight = torch.arange(2 * 8, dtype=torch.float32).reshape(16, 1)  # 2 heads of 8 rows
    permuted = llama_rope_permute(weight, 2)[:, 0].tolist()
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_unsupported_architecture_is_refused_in_one_line() -> None:
    with pytest.raises(UnsupportedArchitectureError) as caught:
        family_for({"architectures": ["GPTNeoXForCausalLM"]}, "src/config.json")
    message = str(caught.value)
    assert "\n" not in message and "GPTNeoXForCausalLM" in message and "Qwen3MoeForCausalLM" in message


def test_q4_k_m_follows_llama_cpp_rule() -> None:
    layers = 32
    more = [i for i in range(layers) if use_more_bits(i, layers)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert mix_type("Q4_K_M", "output.weight", 4096, layers=layers) == "Q6_K"
    assert mix_type("Q4_K_M", "token_embd.weight", 4096, layers=layers) == "Q4_K"
    assert mix_type("Q4_K_M", "blk.3.attn_v.weight", 4096, layers=layers) == "Q6_K"
    assert mix_type("Q4_K_M", "blk.4.attn_v.weight", 4096, layers=layers) == "Q4_K"
    assert mix_type("Q4_K_M", "blk.6.ffn_down.weight", 14336, layers=layers) == "Q6_K"
    assert mix_type("Q4_K_M", "blk.7.ffn_down.weight", 14336, layers=layers) == "Q4_K"
    assert mix_type("Q5_K_M", "blk.7.ffn_up.weight", 4096, layers=layers) == "Q5_K"
    assert mix_type("Q4_K_M", "blk.0.attn_v.weight", 4096, layers=layers, experts=8) == "Q8_0"
    # SmolLM2's 576-wide rows: k-quants fall back as llama.cpp's do.
    assert mix_type("Q4_K_M", "blk.5.attn_q.weight", 576, layers=30) == "Q5_0"
    assert mix_type("Q5_K_M", "blk.5.attn_q.weight", 576, layers=30) == "Q5_1"
    assert mix_type("Q4_K_M", "output.weight", 576, layers=30) == "Q8_0"
    assert mix_type("Q6_K", "blk.0.ffn_up.weight", 100, layers=30) == "F16"


def test_moe_router_stays_f32_and_expert_count_is_read_under_both_keys() -> None:
    for scheme in ("Q4_K_M", "Q8_0", "F16"):
        assert mix_type(scheme, "blk.0.ffn_gate_inp.weight", 2048, layers=48, experts=128) == "F32"
    assert mix_type("Q4_K_M", "blk.47.ffn_down_exps.weight", 768, layers=48, experts=128) == "Q6_K"
    config = {"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2, "num_local_experts": 8,
              "norm_topk_prob": True}
    family = family_for(config)
    target = map_tensor("model.layers.1.mlp.experts.5.down_proj.weight", config, family)
    assert target is not None and (target.name, target.expert) == ("blk.1.ffn_down_exps.weight", (5, 8))


def test_qwen3_moe_llama_cpp_would_compute_differently_is_refused_in_one_line() -> None:
    # llama.cpp's qwen3moe always normalises the top-k weights: such a GGUF would compute another model.
    with pytest.raises(UnsupportedArchitectureError) as caught:
        family_for({"architectures": ["Qwen3MoeForCausalLM"], "norm_topk_prob": False}, "src/config.json")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("src/config.json: ") and "norm_topk_prob" in message
    # Nor with dense layers: llama.cpp's qwen3moe loads experts for every layer.
    with pytest.raises(UnsupportedArchitectureError, match=r"mlp_only_layers \[0\], decoder_sparse_step 1\)"):
        family_for({"architectures": ["Qwen3MoeForCausalLM"], "norm_topk_prob": True, "mlp_only_layers": [0]})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vocab_size": None}, "lacks 'vocab_size', which GGUF output needs"),
        ({"num_hidden_layers": "two"}, "'num_hidden_layers' must be an integer for GGUF output, not 'two'"),
        ({"rms_norm_eps": "1e-6"}, "'rms_norm_eps' must be a number for GGUF output, not '1e-6'"),
        ({"rope_scaling": [1]}, "'rope_scaling' must be an object for GGUF output, not [1]"),
        ({"head_dim": True}, "'head_dim' must be an integer for GGUF output, not True"),
        ({"num_experts": 4}, "lacks 'num_experts_per_tok', 'moe_intermediate_size', which GGUF output needs"),
    ],
)
def test_a_config_the_gguf_header_cannot_be_written_from_is_refused_in_one_line(change, message) -> None:
    # Each of these passed planning and failed in the worker writing the first split ("'vocab_size'").
    config, _ = _llama()
    check_config(config, "src/config.json")  # as transformers writes it
    config = {k: v for k, v in {**config, **change}.items() if v is not None}
    with pytest.raises(CheckpointError) as refused:
        check_config(config, "src/config.json")
    assert str(refused.value) == f"src/config.json: {message}"
