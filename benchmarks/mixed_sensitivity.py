"""Where a 4-bit model's loss comes from, on SmolLM2-135M: what `flows.mixed.sensitivity` was fitted on.

    .venv/bin/python benchmarks/mixed_sensitivity.py [--tokens 1024] [--layers 30]

One group of Linear weights at a time is quantized with NVFP4A16 (RTN) in-process and the model's
mean KL(original || quantized) measured, the rest left in bf16: per projection (q, k, v, o, gate,
up, down: every layer at once), then per layer (all seven projections), and int4 g64 on attention,
gate/up and down. A rank-1 fit KL ~ role x depth x (relative weight error) over the NVFP4 groups
gives a factor per projection and per layer; the int4 rows say how much more KL an integer grid
costs per unit of relative error than NVFP4 (the planner's format weight). Prints the figures; the
planner's constants are rounded from them (see the module docstring of flows.mixed.sensitivity).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.methods import _windows  # noqa: E402
from quantizers import get_scheme, quantize  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    assert match is not None
    return int(match.group(1))


def _projection(name: str) -> str:
    return next(p for p in PROJECTIONS if f".{p}." in name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=None, help="measure only the first N layers one by one")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.smollm2 import smollm2_checkpoint

    path = str(smollm2_checkpoint())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = _windows(AutoTokenizer.from_pretrained(path), args.tokens, min(512, args.tokens))
    with torch.no_grad():
        reference = [model(ids).logits.float().log_softmax(-1) for ids in windows]
    params = dict(model.named_parameters())
    names = [n for n in params if ".layers." in n and any(f".{p}." in n for p in PROJECTIONS)]
    original = {n: params[n].detach().to(torch.bfloat16).clone() for n in names}
    schemes = {"nvfp4": get_scheme("NVFP4A16"), "int4 g64": get_scheme("W4A16", group_size=64)}
    dequantized, relative = {}, {}
    for label, scheme in schemes.items():
        for n in names:
            result = quantize(original[n], scheme, compile=False)
            dequantized[label, n] = result.dequantized.float()
            relative[label, n] = float(result.error.relative_error) ** 2

    def kl_with(label: str, group: list[str]) -> float:
        for n in group:
            params[n].data = dequantized[label, n]
        kl, count = 0.0, 0
        with torch.no_grad():
            for ids, log_p in zip(windows, reference, strict=True):
                log_q = model(ids).logits.float().log_softmax(-1)
                kl += float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())
                count += ids.numel()
        for n in group:
            params[n].data = original[n].float()
        return kl / count

    layers = max(map(_layer, names)) + 1
    by_role = {p: kl_with("nvfp4", [n for n in names if _projection(n) == p]) for p in PROJECTIONS}
    by_layer = {i: kl_with("nvfp4", [n for n in names if _layer(n) == i])
                for i in range(min(layers, args.layers or layers))}
    print("NVFP4A16 rtn, KL per projection (all layers):", {p: round(v, 5) for p, v in by_role.items()})
    print("NVFP4A16 rtn, KL per layer (all projections):", [round(v, 5) for v in by_layer.values()])
    role = dict.fromkeys(PROJECTIONS, 1.0)
    depth = [1.0] * layers
    for _ in range(50):  # alternating least-ratio fit of KL ~ role x depth x relative error
        for p in PROJECTIONS:
            members = [n for n in names if _projection(n) == p]
            role[p] = by_role[p] / sum(depth[_layer(n)] * relative["nvfp4", n] for n in members)
        for i, kl in by_layer.items():
            members = [n for n in names if _layer(n) == i]
            depth[i] = kl / sum(role[_projection(n)] * relative["nvfp4", n] for n in members)
        mean = sum(depth) / layers
        depth = [d / mean for d in depth]
    mlp = (role["gate_proj"] + role["up_proj"]) / 2
    print("role factor (dense MLP gate/up mean = 1):", {p: round(v / mlp, 2) for p, v in role.items()})
    print("depth factor (mean 1):", [round(d, 2) for d in depth])
    int4_groups = (("attention", "self_attn"), ("gate/up", "gate_proj|up_proj"), ("down", "down_proj"))
    for label, pattern in int4_groups:
        group = [n for n in names if re.search(pattern, n)]
        predicted = sum(role[_projection(n)] * depth[_layer(n)] * relative["int4 g64", n] for n in group)
        measured = kl_with("int4 g64", group)
        print(f"int4 g64 on {label}: KL {measured:.5f}, {measured / predicted:.2f}x what its relative error "
              "predicts with the NVFP4 fit")


if __name__ == "__main__":
    main()
