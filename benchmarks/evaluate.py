"""Evaluation throughput: tokens/s of `quantfleet evaluate` for a ~100M-parameter Llama-shaped model.

Builds a Llama-shaped model from a config (hidden 768, 8 layers, MLP 2048, GQA 12/4 heads, vocab
30,522 with MiniLM's tokenizer, untied head: ~97M parameters, bf16 on disk), converts it to
W4A16 with the real pipeline (local Ray), then evaluates the copy against the original on the
built-in text with the defaults (8,192 tokens, windows of 512, float32 on CPU). Prints the
figures and writes/replaces the "## Evaluation" section of docs/benchmarks.md.

    .venv/bin/python benchmarks/evaluate.py [--tokens 8192] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Evaluation"


def build_model(path: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flows.cli import bundled_model_path

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(Path(bundled_model_path()) / name, path / name)
    return sum(p.numel() for p in model.parameters())


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def replace_section(document: str, section: str) -> str:
    """`document` with its SECTION (up to the next '## ' heading) replaced, or section appended."""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(document):
        return pattern.sub(lambda _: section, document, count=1)
    return document.rstrip("\n") + "\n\n" + section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens to evaluate (default: 8192)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from flows.pipeline import run_conversion
    from flows.recipe import Recipe
    from workers.evaluation.evaluate import evaluate

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="quantfleet-bench-eval-"))
    try:
        original, quantized = work / "llama-100m", work / "llama-100m-w4a16"
        params = build_model(original)
        started = time.perf_counter()
        run_conversion(str(original), str(quantized), Recipe.preset("W4A16"), shard_size=100_000_000)
        convert_s = time.perf_counter() - started
        import ray

        ray.shutdown()  # give the evaluation every core
        rss_before = _peak_rss_mib()
        result = evaluate(str(original), str(quantized), max_tokens=args.tokens)
        figures = {
            "params": params, "tokens": result.tokens, "windows": result.windows,
            "seconds": result.seconds, "tokens_per_s": result.tokens_per_s,
            "mean_kl": result.mean_kl, "p99_kl": result.p99_kl, "top1": result.top1,
            "convert_s": convert_s, "peak_rss_mib": _peak_rss_mib(), "rss_before_mib": rss_before,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(result.table())
    for key, value in figures.items():
        print(f"{key}: {value}")

    cpus = os.cpu_count()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    run_s = figures["tokens"] / figures["tokens_per_s"]
    section = (
        f"{SECTION}\n\n"
        f"Measured with `.venv/bin/python benchmarks/evaluate.py` on {date.today().isoformat()} "
        f"(commit {commit}; {platform.machine()}, {cpus} CPUs, Python {platform.python_version()}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads). A Llama-shaped model built from "
        f"a config ({params / 1e6:.0f}M parameters: hidden 768, 8 layers, MLP 2048, vocab 30,522, untied "
        "head; random weights) against its W4A16 conversion, both loaded with transformers (the "
        "quantized one decompressed by compressed-tensors) in float32 on CPU, on the built-in text "
        f"in windows of {result.context} tokens. Tokens/s counts text tokens through both models "
        "and the per-token KL/top-1/NLL, loading excluded. The figures of a random-weight model "
        "are not quality anchors; only the speed is.\n\n"
        "| workload | result |\n|---|---|\n"
        f"| evaluate {figures['tokens']:,} tokens ({figures['windows']} windows) | "
        f"**{figures['tokens_per_s']:,.0f} tokens/s** ({run_s:.1f} s running; "
        f"{figures['seconds']:.1f} s in all with loading both models) |\n"
        f"| peak RSS of the process | {figures['peak_rss_mib']:,.0f} MiB "
        f"(before the evaluation {figures['rss_before_mib']:,.0f} MiB) |\n"
        f"| for scale: converting the same model to W4A16 (local Ray, incl. start-up) | "
        f"{figures['convert_s']:.1f} s |\n\n"
    )
    if not args.no_write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        document = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
        DOC.write_text(replace_section(document, section))
        print(f"wrote the {SECTION!r} section of {DOC}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
