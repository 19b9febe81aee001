"""Run an original checkpoint and its quantized copy on the same text and compare their outputs.

Both load with transformers (a compressed-tensors one dequantized by quantfleet's own
dequantizers, see `dequantized`; a GGUF by the `gguf` package's, into the original's architecture,
see `gguf_model`), on the GPU when there is one, in float32 unless told otherwise. The text
is tokenized once, cut into windows of `context` tokens (a BOS is put in front of each when the
tokenizer has one) and run a few windows at a time, so memory holds both models and one batch of
logits, never the logits of the whole text. Remote checkpoints (s3://) are downloaded to a
temporary folder first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from infra.errors import InfraError
from infra.storage import open_storage, parse_uri
from workers.evaluation.dequantized import is_compressed, load_dequantized
from workers.evaluation.errors import EvaluationError
from workers.evaluation.gguf_model import is_gguf, load_gguf_dequantized
from workers.evaluation.measures import CausalAccumulator, EncoderAccumulator
from workers.evaluation.records import Evaluation, Kind
from workers.evaluation.source_model import SourceModel, load_source_dequantized
from workers.evaluation.text import load_text

__all__ = ["Evaluation", "EvaluationError", "evaluate", "model_kind", "local_copy"]

_log = logging.getLogger(__name__)
_LOGITS_BUDGET = 256 << 20  # bytes of float32 logits per model per batch
_DOWNLOAD_CHUNK = 32 << 20

@contextmanager
def local_copy(uri: str, scratch_dir: str | None = None) -> Iterator[Path]:
    """A local folder holding the checkpoint at `uri`: the folder itself, or a temporary download."""
    try:
        parsed = parse_uri(uri)
    except InfraError as error:
        raise EvaluationError(str(error)) from error
    if parsed.scheme == "file":
        path = Path(parsed.path)
        if not (path / "config.json").is_file() and not is_gguf(path):
            raise EvaluationError(f"{uri}: no config.json; not a transformers checkpoint folder or a GGUF")
        yield path
        return
    target = Path(tempfile.mkdtemp(prefix="quantfleet-eval-", dir=scratch_dir))
    try:
        storage = open_storage(uri)
        count = 0
        for info in storage.list(""):
            if info.key.startswith(".") or "/." in info.key:
                continue  # staging areas and hidden files
            local = target / info.key
            local.parent.mkdir(parents=True, exist_ok=True)
            with local.open("wb") as handle:
                for offset in range(0, info.size, _DOWNLOAD_CHUNK):
                    length = min(_DOWNLOAD_CHUNK, info.size - offset)
                    handle.write(storage.read_range(info.key, offset, length))
            count += 1
        if not (target / "config.json").is_file() and not is_gguf(target):
            raise EvaluationError(f"{uri}: no config.json ({count} files); not a transformers checkpoint "
                                  "or a GGUF")
        yield target
    except InfraError as error:
        raise EvaluationError(f"{uri}: cannot download the checkpoint: {error}") from error
    finally:
        shutil.rmtree(target, ignore_errors=True)


def model_kind(path: Path) -> Kind:
    """causal-lm for *ForCausalLM / *LMHeadModel architectures, else encoder."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path}/config.json: cannot read: {error}") from error
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    return "encoder"


def _device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def _load(path: Path, kind: Kind, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Load a checkpoint; a compressed-tensors one is dequantized to dense weights on load.

    Dequantized by quantfleet's own dequantizers (see `dequantized`), which give exactly the
    weights the conversion verified and what compressed-tensors decompresses them to, then cast to
    the requested dtype; transformers' own dequantizing path mixes up config groups.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    if is_compressed(path):
        model = load_dequantized(path, causal=kind == "causal-lm", dtype=dtype)
    else:
        loader: Any = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
        try:
            model = loader.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as error:
            raise EvaluationError(f"{path}: cannot load with transformers: {error}") from error
    return model.to(device=device, dtype=dtype).eval()


def _tokenizer(*paths: Path) -> Any:
    from transformers import AutoTokenizer

    errors = []
    for path in paths:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            errors.append(f"{path}: {error}".splitlines()[0])
            continue
        # With a config but no tokenizer files, transformers 5 builds an empty tokenizer (one
        # token) instead of failing: every text then "gives fewer than 2 tokens".
        if len(tokenizer) < 2:
            errors.append(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model, vocab...)")
            continue
        return tokenizer
    raise EvaluationError("no tokenizer in either checkpoint: " + "; ".join(errors))


def _specials(tokenizer: Any, kind: Kind) -> tuple[list[int], list[int]]:
    """Token ids put before and after each window: BOS for causal LMs, [CLS] ... [SEP] for BERT."""
    if kind == "causal-lm":
        bos = tokenizer.bos_token_id
        return ([bos] if bos is not None else []), []
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return ([first] if first is not None else []), ([last] if last is not None else [])


def _windows(ids: list[int], body: int) -> list[list[int]]:
    return [ids[i : i + body] for i in range(0, len(ids), body) if len(ids[i : i + body]) >= 2]


def _batches(windows: list[list[int]], batch: int) -> Iterator[list[list[int]]]:
    """Batches of equal-length windows (only the last window may be shorter)."""
    full = [w for w in windows if len(w) == len(windows[0])]
    for i in range(0, len(full), batch):
        yield full[i : i + batch]
    for window in windows[len(full) :]:
        yield [window]


def evaluate(
    original: str,
    quantized: str,
    *,
    text: str | None = None,
    max_tokens: int = 8192,
    context: int = 512,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int | None = None,
    scratch_dir: str | None = None,
    threads: int | None = None,
    original_source: SourceModel | None = None,
) -> Evaluation:
    """Compare the quantized checkpoint at `quantized` with `original` (folders or URIs).

    `original_source`: `original` is itself quantized (block-FP8, MXFP4, ...); it is then loaded
    as the dense model it means, dequantized as the conversion's workers do (see `source_model`).

    `threads`: CPU threads for torch (None: torch's default; 0: every core of this machine, for a
    Ray task that Ray started with one thread).
    """
    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads or os.cpu_count() or 1)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise EvaluationError(f"unsupported dtype {dtype!r} (use float32, bfloat16 or float16)")
    if max_tokens < 16 or context < 8:
        raise EvaluationError(f"need max_tokens >= 16 and context >= 8, got {max_tokens} and {context}")
    source = load_text(text)
    target = _device(device)
    with (
        local_copy(original, scratch_dir) as original_dir,
        local_copy(quantized, scratch_dir) as quantized_dir,
    ):
        kind = model_kind(original_dir)
        gguf = is_gguf(quantized_dir)
        if not gguf and model_kind(quantized_dir) != kind:
            named = {"encoder": "an encoder", "causal-lm": "a causal LM"}.get(kind, f"a {kind}")
            raise EvaluationError(f"{original} is {named} but {quantized} is not")
        tokenizer = _tokenizer(original_dir, quantized_dir)
        if original_source is not None:
            reference = load_source_dequantized(original_dir, original_source, causal=kind == "causal-lm",
                                                dtype=torch_dtype).to(device=target, dtype=torch_dtype).eval()
        else:
            reference = _load(original_dir, kind, target, torch_dtype)
        if gguf:  # no config of its own: the original's architecture, the GGUF's weights
            other = load_gguf_dequantized(quantized_dir, original_dir, causal=kind == "causal-lm",
                                          dtype=torch_dtype).to(device=target, dtype=torch_dtype).eval()
        else:
            other = _load(quantized_dir, kind, target, torch_dtype)
        ids = tokenizer(source.text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
        limit = getattr(reference.config, "max_position_embeddings", None) or context
        head, tail = _specials(tokenizer, kind)
        window = min(context, limit)
        body = window - len(head) - len(tail)
        if body < 2:
            raise EvaluationError(f"context {window} leaves no room for text after special tokens")
        windows = _windows(ids, body)
        if not windows:
            raise EvaluationError(f"the evaluation text {source.name!r} gives fewer than 2 tokens")
        vocab = int(getattr(reference.config, "vocab_size", 0) or 0)
        per_window = window * max(vocab, 1) * 4 if kind == "causal-lm" else window * 4096 * 4
        batch = batch_size or max(1, min(16, _LOGITS_BUDGET // per_window))
        loaded = time.perf_counter()
        if kind == "causal-lm":
            causal = CausalAccumulator()
            for group in _batches(windows, batch):
                tensor = torch.tensor([head + w for w in group], device=target)
                with torch.inference_mode():
                    logits_ref = reference(input_ids=tensor).logits
                    logits_q = other(input_ids=tensor).logits
                causal.add(logits_ref, logits_q, tensor, first=0)
                del logits_ref, logits_q
            figures: dict[str, Any] = causal.summary()
        else:
            encoder = EncoderAccumulator()
            for group in _batches(windows, batch):
                tensor = torch.tensor([head + w + tail for w in group], device=target)
                mask = torch.ones_like(tensor)
                with torch.inference_mode():
                    hidden_ref = reference(input_ids=tensor, attention_mask=mask).last_hidden_state
                    hidden_q = other(input_ids=tensor, attention_mask=mask).last_hidden_state
                encoder.add(hidden_ref, hidden_q)
            figures = encoder.summary()
        running = time.perf_counter() - loaded
        del reference, other
    seconds = time.perf_counter() - started
    tokens = sum(len(w) for w in windows)
    for name, value in figures.items():
        if isinstance(value, float) and not math.isfinite(value):
            _log.warning("evaluation figure %s is %s", name, value)
    return Evaluation(
        kind=kind, original=original, quantized=quantized, text=source.name, text_sha256=source.sha256,
        tokens=tokens, windows=len(windows), context=window, device=str(target), dtype=dtype,
        seconds=seconds, tokens_per_s=tokens / running if running > 0 else 0.0,
        reference=original_source.reference() if original_source is not None else None, **figures,
    )
