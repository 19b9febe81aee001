"""Quantized sources built by the tests: tiny transformers models saved as published checkpoints are.

No network: models come from configs with random weights. `save_block_fp8` writes what DeepSeek
and Kimi publish (E4M3 weights, float32 `weight_scale_inv` per 128x128 tile, `quant_method: fp8`),
with every scale in a second file so the planner must pair across files through the index; it
also writes the dequantized bf16 equivalent, the reference the conversion must match.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["tiny_deepseek", "add_mtp_layer", "save_block_fp8", "fp8_block_quantize", "QUANTIZED_LINEAR",
           "run_plain"]

# The Linears DeepSeek-V3 stores in FP8 (not embeddings, norms, the router or the head).
QUANTIZED_LINEAR = re.compile(r".*(proj|proj_with_mqa)\.weight$")


def tiny_deepseek(path: Path, seed: int = 0) -> Path:
    """A 2-layer DeepSeek-V3-shaped model (MLA, 4 routed + 1 shared expert), bf16, one file."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(
        vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
        max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def add_mtp_layer(path: Path, seed: int = 1) -> list[str]:
    """Append a DeepSeek multi-token-prediction layer to the tiny model saved in `path`, as
    DeepSeek-V3 publishes one: `model.layers.{num_hidden_layers}.*`, a decoder layer (MoE, one 2-D
    weight per expert) plus
    `eh_proj`, `enorm`, `hnorm`, `shared_head.{norm,head}` and its own `embed_tokens`, declared by
    `num_nextn_predict_layers: 1`. Returns the layer's tensor names."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = json.loads((path / "config.json").read_text())
    layers = config["num_hidden_layers"]
    torch.manual_seed(seed)
    dense_layers = min(config["first_k_dense_replace"], layers)
    wider = DeepseekV3Config.from_dict({**config, "num_hidden_layers": layers + 1,
                                        "first_k_dense_replace": dense_layers})
    donor = DeepseekV3ForCausalLM(wider).to(torch.bfloat16).state_dict()
    prefix = f"model.layers.{layers}."
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    mtp: dict[str, torch.Tensor] = {}
    for name, tensor in donor.items():
        if not name.startswith(prefix):
            continue
        fused = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", name)
        if fused is None:
            mtp[name] = tensor.contiguous()
            continue
        # Per-expert 2-D weights, as DeepSeek publishes every layer (transformers fuses on load).
        for e, expert in enumerate(tensor):
            if fused[2] == "down_proj":
                mtp[f"{fused[1]}.{e}.down_proj.weight"] = expert.contiguous()
            else:
                gate, up = expert.chunk(2)
                mtp[f"{fused[1]}.{e}.gate_proj.weight"] = gate.contiguous()
                mtp[f"{fused[1]}.{e}.up_proj.weight"] = up.contiguous()
    mtp.update({
        f"{prefix}eh_proj.weight": (torch.randn(hidden, 2 * hidden) * 0.02).to(torch.bfloat16),
        f"{prefix}enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{prefix}hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{prefix}shared_head.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{prefix}shared_head.head.weight": (torch.randn(vocab, hidden) * 0.02).to(torch.bfloat16),
        f"{prefix}embed_tokens.weight": (torch.randn(vocab, hidden) * 0.02).to(torch.bfloat16),
    })
    files = sorted(path.glob("*.safetensors"))
    tensors = load_file(files[0])
    tensors.update(mtp)
    save_file(tensors, files[0], metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({name: files[0].name for name in mtp})
        index.write_text(json.dumps(data))
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}, indent=2))
    return sorted(mtp)


def fp8_block_quantize(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """As DeepSeek's `act_quant`/`weight_quant`: fp8 = w / s, s = tile absmax / 448 (float32)."""
    rows, cols = weight.shape
    tr, tc = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.nn.functional.pad(weight.float(), (0, tc * block - cols, 0, tr * block - rows))
    tiles = padded.view(tr, block, tc, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(tr * block, tc * block)[:rows, :cols].contiguous(), scale


def save_block_fp8(bf16: Path, out: Path, reference: Path) -> None:
    """Write `bf16` as a block-FP8 source in `out`, and its dequantized bf16 twin in `reference`."""
    tensors = {}
    for file in sorted(bf16.glob("*.safetensors")):
        tensors.update(load_file(file))
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if QUANTIZED_LINEAR.fullmatch(name) and tensor.dim() == 2:
            q, scale = fp8_block_quantize(tensor)
            weights[name], scales[f"{name}_scale_inv"] = q, scale
            expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
            dense[name] = (q.float() * expanded).to(torch.bfloat16)
        else:
            weights[name] = dense[name] = tensor
    config = json.loads((bf16 / "config.json").read_text())
    for target in (out, reference):
        target.mkdir(parents=True)
        for side in bf16.iterdir():
            if side.name == "generation_config.json":
                (target / side.name).write_bytes(side.read_bytes())
    save_file(weights, out / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(scales, out / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in weights}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in scales})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    source_config = dict(config, quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    })
    (out / "config.json").write_text(json.dumps(source_config, indent=2))
    save_file(dense, reference / "model.safetensors", metadata={"format": "pt"})
    (reference / "config.json").write_text(json.dumps(config, indent=2))


def run_plain(source: str, dest: str, scheme: str, shard_size: int = 5_000_000_000, **recipe: object) -> Any:
    """plan -> convert every unit in this process -> finalize and publish (no Ray: the same
    functions the Ray tasks and the Prefect flow run)."""
    from flows.pipeline import check_not_published, finalize_and_publish, plan_conversion, unit_context
    from flows.recipe import Recipe
    from workers.convert_unit import convert_unit

    plan = plan_conversion(source, Recipe.preset(scheme, **recipe), shard_size=shard_size)
    context = unit_context(plan, check_not_published(dest), "cpu")
    results = [convert_unit(unit, context) for unit in plan.units]
    finalize_and_publish(plan, dest, results)
    return plan


def dequantized_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a compressed-tensors result run through quantfleet's own dequantizing loader (what
    `quantfleet evaluate` runs): for NVFP4 experts of fused-experts models, which transformers 5.23
    folds without their global scale. Where both load, the two give the same logits."""
    from workers.evaluation.dequantized import load_dequantized

    model = load_dequantized(path, causal=True, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return model(ids).logits.float()
