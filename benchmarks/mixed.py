"""Mixed precision on SmolLM2-135M: mean KL at a budget against uniform 4-bit RTN schemes.

    .venv/bin/python benchmarks/mixed.py [--tokens 2048] [--bits 5.0] [--ablation] [--no-doc]

The plan is the real one: `plan_conversion` with `target_bits` (the measure pass runs on a local
Ray, one task per unit, exactly as `quantfleet convert` would). Each tensor is then quantized
in-process with its planned scheme and method by `quantizers.quantize` (what the workers run) and
its dequantized form put in the model, which is what the compressed-tensors checkpoint decompresses
to; so the KL is the converted checkpoint's without writing it. Uniform points: W4A16 g128 (falls
back to g64 on the 576-wide inputs), W4A16 g64 and NVFP4A16, all RTN; W4A16_ASYM g32/g64 is left
out of "best uniform 4-bit" because SmolLM2's weights came from Q4_1 (asymmetric g32), which it
reproduces artificially well. The mixed plans use the default candidates a user gets from
`--target-bits` (`flows.mixed.budget`: W4A16 g128/g64, W8A16 and FP8 per channel RTN, NVFP4A16
searched), so uniform NVFP4A16 with search is shown too, for reference. Also a mixed plan at a
budget equal to uniform W4A16 g64's size, and (`--ablation`) the 5-bit plan with every role/depth
sensitivity 1. The model runs in float32 on bf16-valued weights; KL(original || quantized) per
token over the first `--tokens` tokens of the built-in text in windows of 512, and top-1 agreement.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._doc import machine_line, update_section  # noqa: E402
from benchmarks.methods import _windows  # noqa: E402
from quantizers import QuantScheme, get_scheme, quantize  # noqa: E402


def _kl(model, windows, reference) -> tuple[float, float]:  # noqa: ANN001
    kl, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for ids, log_p in zip(windows, reference, strict=True):
            log_q = model(ids).logits.float().log_softmax(-1)
            kl += float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            count += ids.numel()
    return kl / count, agree / count


_DONE: dict[tuple[str, str, str], tuple[torch.Tensor, int]] = {}


def _apply(model, originals, choice: dict[str, tuple[QuantScheme, str]]) -> float:  # noqa: ANN001
    """Put each tensor's dequantized weight in the model; returns stored bits per quantized weight.

    Each (tensor, scheme, method) is quantized once per run (the rows share most of them)."""
    params = dict(model.named_parameters())
    bits = elements = 0
    for name, (scheme, method) in choice.items():
        key = (name, scheme.model_dump_json(), method)
        if key not in _DONE:
            result = quantize(originals[name], scheme, compile=False, method=method)
            _DONE[key] = (result.dequantized, 8 * result.stored_bytes)
        dequantized, stored_bits = _DONE[key]
        params[name].data = dequantized.float()
        bits += stored_bits
        elements += originals[name].numel()
    return bits / elements


def _label(method: str) -> str:
    # The default method's candidates are flows.mixed.budget's defaults (NVFP4A16 searched, others RTN).
    return "default candidates" if method == "rtn" else f"every candidate {method}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--bits", type=float, default=5.0, help="mixed budget, bits per quantized weight")
    parser.add_argument("--methods", default="rtn",
                        help="comma-separated recipe methods of the mixed plans (default: %(default)s, which "
                        "gives the default candidates; search or hqq applies that method to every candidate)")
    parser.add_argument("--ablation", action="store_true",
                        help="also plan with every sensitivity 1 (no role/depth prior), for comparison")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.pipeline import plan_conversion
    from flows.recipe import Recipe
    from tests.smollm2 import smollm2_checkpoint

    path = str(smollm2_checkpoint())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = _windows(AutoTokenizer.from_pretrained(path), args.tokens, 512)
    with torch.no_grad():
        reference = [model(ids).logits.float().log_softmax(-1) for ids in windows]
    params = dict(model.named_parameters())
    base = plan_conversion(path, Recipe.preset("W4A16"))
    targeted = [j.name for j in base.jobs() if j.scheme is not None]
    originals = {n: params[n].detach().to(torch.bfloat16).clone() for n in targeted}
    rows: list[list[str]] = []

    def run(label: str, choice: dict[str, tuple[QuantScheme, str]]) -> float:
        bpw = _apply(model, originals, choice)
        kl, top1 = _kl(model, windows, reference)
        rows.append([label, f"{bpw:.3f}", f"{kl:.4f}", f"{top1:.3f}", ""])
        print(" | ".join(rows[-1]), flush=True)
        return kl

    def planned(plan) -> dict[str, tuple[QuantScheme, str]]:  # noqa: ANN001
        return {j.name: (plan.schemes[j.scheme], plan.method_of(j.scheme))
                for j in plan.jobs() if j.scheme is not None}

    uniform = {"W4A16 g128 rtn": get_scheme("W4A16"), "W4A16 g64 rtn": get_scheme("W4A16", group_size=64),
               "NVFP4A16 rtn": get_scheme("NVFP4A16")}
    kls = {label: run(f"uniform {label}", {n: (s, "rtn") for n in targeted}) for label, s in uniform.items()}
    best = min(kls, key=kls.__getitem__)
    g64_bytes = None
    for method in args.methods.split(","):
        plan = plan_conversion(path, Recipe.preset("W4A16", target_bits=args.bits, method=method))
        assert plan.mixed is not None
        kl = run(f"mixed {args.bits:g} bits ({_label(method)})", planned(plan))
        rows[-1][4] = f"KL {kl / kls[best]:.2f}x the best uniform 4-bit RTN's ({best})"
        if g64_bytes is None:
            g64 = plan_conversion(path, Recipe.preset("W4A16", group_size=64))
            g64_bytes = g64.bytes_out
    # For reference only (not an RTN scheme): what the search alone gives NVFP4A16 uniformly.
    run("uniform NVFP4A16 search (not RTN: for reference)",
        {n: (get_scheme("NVFP4A16"), "search") for n in targeted})
    same = plan_conversion(path, Recipe.preset("W4A16", target_size=g64_bytes))
    assert same.mixed is not None
    kl = run("mixed at uniform W4A16 g64's size (default candidates)", planned(same))
    rows[-1][4] = f"KL {kl / kls['W4A16 g64 rtn']:.2f}x uniform W4A16 g64's"
    if args.ablation:
        # The role/depth prior against none: the same measurements, every sensitivity 1.
        from flows.mixed import planner

        prior = planner.sensitivity
        planner.sensitivity = lambda name, layers: 1.0  # type: ignore[assignment]
        try:
            flat = plan_conversion(path, Recipe.preset("W4A16", target_bits=args.bits))
        finally:
            planner.sensitivity = prior
        kl = run(f"mixed {args.bits:g} bits (default candidates), no role/depth prior", planned(flat))
        rows[-1][4] = f"KL {kl / kls[best]:.2f}x the best uniform 4-bit RTN's"
    if not args.no_doc:
        body = (
            "Measured with `.venv/bin/python benchmarks/mixed.py "
            f"--tokens {args.tokens} --bits {args.bits:g}{' --ablation' if args.ablation else ''}` "
            f"({machine_line()}). " + (__doc__ or "").split("\n\n", 2)[2].replace("\n", " ").strip()
            + "\n\n| SmolLM2-135M | bits per quantized weight | mean KL | top-1 | |\n|---|---|---|---|---|\n"
            + "\n".join("| " + " | ".join(r) + " |" for r in rows)
        )
        update_section("Mixed precision on SmolLM2", body)


if __name__ == "__main__":
    main()
