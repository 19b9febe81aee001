"""A Hugging Face tokenizer as GGUF metadata: tokens, types, merges, special tokens, chat template.

llama.cpp runs its own tokenizer from these keys, so the first split of every GGUF we write
carries them. Two kinds of `tokenizer.json` are written:

- SentencePiece-style ones (a Unigram model, or BPE with byte fallback: Llama 2, Mistral
  v0.1-v0.3) as llama.cpp's `llama` tokenizer model, with scores and `add_space_prefix`
  (`infra.gguf.spm`), no merges and no pre-tokenizer name;
- byte-level BPE ones (GPT-2, Llama 3, Qwen2/3, SmolLM) as llama.cpp's `gpt2` tokenizer model,
  the way `convert_hf_to_gguf.py`'s `get_vocab_base` does: tokens by id (ids without a token
become `[PAD<id>]`, UNUSED), added tokens CONTROL when special else USER_DEFINED. Special token ids,
`add_bos/eos_token`, merges and the chat template are read by the `gguf` package's own
`SpecialVocab`, from a local copy of the tokenizer files.

`tokenizer.ggml.pre` names the pre-tokenizer regex llama.cpp applies. convert_hf_to_gguf picks it
from a hash of the tokenizer's output on a test text (a table that lives in that script, not in the
`gguf` package); here it is recognised from the pre-tokenizer declared in tokenizer.json, for the
families quantfleet writes. An unrecognised one is left out and llama.cpp uses its default.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf

from infra.errors import CheckpointError
from infra.gguf.header import MetadataValue
from infra.gguf.spm import add_space_prefix, is_sentencepiece, sentencepiece_vocab
from infra.storage import Storage

__all__ = ["tokenizer_metadata", "TOKENIZER_FILES", "pre_tokenizer_name"]

V = gguf.GGUFValueType
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")

_LLAMA3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
           "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
          "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_SPLIT_PATTERNS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json, or None when not recognised."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return _SPLIT_PATTERNS.get(pattern or "")
    return None


def _tokens(tokenizer: dict[str, Any], vocab_size: int, where: str) -> tuple[list[str], list[int]]:
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise CheckpointError(
            f"{where}: a {model.get('type', 'unknown')} tokenizer cannot be written as GGUF; only BPE "
            "(byte-level or with byte fallback) and Unigram tokenizers can"
        )
    by_id: dict[int, str] = {int(i): token for token, i in model["vocab"].items()}
    added = {int(entry["id"]): entry for entry in tokenizer.get("added_tokens", [])}
    for token_id, entry in added.items():
        by_id[token_id] = entry["content"]
    size = max(vocab_size, max(by_id, default=-1) + 1)
    tokens, types = [], []
    for token_id in range(size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif token_id in added:
            tokens.append(by_id[token_id])
            special = added[token_id].get("special", False)
            types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[token_id])
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def tokenizer_metadata(source: Storage, vocab_size: int) -> dict[str, MetadataValue]:
    """The `tokenizer.*` keys for the checkpoint in `source`; a missing or unsupported tokenizer
    is refused with one line (llama.cpp cannot load a model without one)."""
    where = source.uri("tokenizer.json")
    if not source.exists("tokenizer.json"):
        raise CheckpointError(f"{where}: missing; GGUF output needs the tokenizer (llama.cpp runs its own)")
    try:
        tokenizer = json.loads(source.read_bytes("tokenizer.json"))
    except ValueError as error:
        raise CheckpointError(f"{where}: not valid JSON: {error}") from error
    sentencepiece = is_sentencepiece(tokenizer)
    values: dict[str, MetadataValue] = {}
    if sentencepiece:
        vocab = sentencepiece_vocab(tokenizer, vocab_size, where)
        tokens, types = vocab.tokens, vocab.types
        values[gguf.Keys.Tokenizer.MODEL] = MetadataValue(V.STRING, "llama")
    else:
        tokens, types = _tokens(tokenizer, vocab_size, where)
        values[gguf.Keys.Tokenizer.MODEL] = MetadataValue(V.STRING, "gpt2")
        pre = pre_tokenizer_name(tokenizer)
        if pre is not None:
            values[gguf.Keys.Tokenizer.PRE] = MetadataValue(V.STRING, pre)
    with tempfile.TemporaryDirectory(prefix="quantfleet-tokenizer-") as local:
        for name in TOKENIZER_FILES:
            if source.exists(name):
                (Path(local) / name).write_bytes(source.read_bytes(name))
        # The `llama` model joins pieces by score and reads no merges.
        special = gguf.SpecialVocab(local, load_merges=not sentencepiece, n_vocab=len(tokens))
    values[gguf.Keys.Tokenizer.LIST] = MetadataValue(V.ARRAY, tokens, V.STRING)
    if sentencepiece:
        values[gguf.Keys.Tokenizer.SCORES] = MetadataValue(V.ARRAY, vocab.scores, V.FLOAT32)
    values[gguf.Keys.Tokenizer.TOKEN_TYPE] = MetadataValue(V.ARRAY, types, V.INT32)
    if sentencepiece:
        values[gguf.Keys.Tokenizer.ADD_PREFIX] = MetadataValue(V.BOOL, add_space_prefix(tokenizer))
    if special.merges:
        values[gguf.Keys.Tokenizer.MERGES] = MetadataValue(V.ARRAY, list(special.merges), V.STRING)
    id_keys = {"bos": gguf.Keys.Tokenizer.BOS_ID, "eos": gguf.Keys.Tokenizer.EOS_ID,
               "unk": gguf.Keys.Tokenizer.UNK_ID, "sep": gguf.Keys.Tokenizer.SEP_ID,
               "pad": gguf.Keys.Tokenizer.PAD_ID, "mask": gguf.Keys.Tokenizer.MASK_ID}
    for kind, token_id in sorted(special.special_token_ids.items()):
        if kind in id_keys:
            values[id_keys[kind]] = MetadataValue(V.UINT32, int(token_id))
    add_keys = {"bos": gguf.Keys.Tokenizer.ADD_BOS, "eos": gguf.Keys.Tokenizer.ADD_EOS,
                "sep": gguf.Keys.Tokenizer.ADD_SEP}
    for kind, flag in sorted(special.add_special_token.items()):
        if kind in add_keys:
            values[add_keys[kind]] = MetadataValue(V.BOOL, bool(flag))
    template = special.chat_template
    if isinstance(template, str):
        values[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = MetadataValue(V.STRING, template)
    elif template:  # named templates: "default" is the main one
        for entry in template:
            name = entry["name"]
            key = (gguf.Keys.Tokenizer.CHAT_TEMPLATE if name == "default"
                   else gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name))
            values[key] = MetadataValue(V.STRING, entry["template"])
    return values
