"""A SentencePiece-style tokenizer.json as llama.cpp's `llama` tokenizer model: tokens, scores, types.

Llama 2, Mistral v0.1-v0.3 and many community models ship a SentencePiece tokenizer: pieces with
`▁` for spaces, `<0xNN>` byte pieces for characters outside the vocabulary (byte fallback), no
byte-level pre-tokenizer. llama.cpp runs those as its `llama` (SPM) tokenizer model, which does not
read merges: it repeatedly joins the adjacent pair whose concatenation is the vocabulary piece with
the highest *score*. convert_hf_to_gguf.py's `_set_vocab_sentencepiece` takes the scores from
`tokenizer.model` (the sentencepiece package); here they come from `tokenizer.json`, which every
such Hugging Face checkpoint ships and which transformers itself runs, so no other package is
needed:

- Unigram models list each piece's score: taken as they are.
- BPE models (`byte_fallback: true`) list merges in priority order instead: the piece a merge
  makes scores minus the merge's rank (its first, when several merges make it), so the highest
  score is the first merge, and llama.cpp's highest-score-first joining picks the merges Hugging
  Face's lowest-rank-first BPE picks. Pieces no merge makes (characters, bytes, specials) score 0;
  llama.cpp never looks them up as a join.
  (convert_hf_to_gguf's `_set_vocab_llama_hf`, for checkpoints without tokenizer.model, writes
  -1000 for every score, which leaves llama.cpp's joins in text order instead.)

Token types as `_set_vocab_sentencepiece` writes them: the model's unknown piece UNKNOWN, `<0xNN>`
BYTE, added tokens CONTROL when special else USER_DEFINED, ids without a piece `[PAD<id>]` UNUSED
(score -1000), everything else NORMAL. `add_space_prefix` (llama.cpp's leading `▁`) follows the
tokenizer's Metaspace pre-tokenizer or its `Prepend("▁")` normalizer. One difference remains,
llama.cpp's and sentencepiece's against transformers': a Metaspace pre-tokenizer adds no `▁` in
front of a text that already starts with a space, llama.cpp always adds one (transformers 5's
`LlamaTokenizer` runs such a Metaspace even for Llama 2's Prepend/Replace normalizer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gguf

from infra.errors import CheckpointError

__all__ = ["SentencePieceVocab", "is_sentencepiece", "sentencepiece_vocab", "add_space_prefix"]

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # ▁, SentencePiece's visible space


@dataclass(frozen=True, slots=True)
class SentencePieceVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]


def is_sentencepiece(tokenizer: dict[str, Any]) -> bool:
    """A Unigram model, or a BPE model with byte fallback (SentencePiece's, not byte-level BPE)."""
    model = tokenizer.get("model") or {}
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))


def _merge_pieces(merges: list[Any]) -> dict[str, int]:
    """The piece each merge makes -> the rank of the first merge that makes it."""
    made: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made.setdefault(left + right, rank)
    return made


def _pieces(model: dict[str, Any], where: str) -> tuple[dict[int, str], dict[int, float], int | None]:
    """(piece by id, score by id, the unknown piece's id) of a Unigram or BPE model."""
    if model["type"] == "Unigram":
        vocab = model.get("vocab") or []
        pieces = {i: str(entry[0]) for i, entry in enumerate(vocab)}
        scores = {i: float(entry[1]) for i, entry in enumerate(vocab)}
        unk = model.get("unk_id")
        return pieces, scores, None if unk is None else int(unk)
    vocab = model.get("vocab") or {}
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{where}: a BPE model whose vocab is not a piece -> id map")
    pieces = {int(i): piece for piece, i in vocab.items()}
    made = _merge_pieces(model.get("merges") or [])
    scores = {i: -float(made[piece]) if piece in made else 0.0 for i, piece in pieces.items()}
    unk_piece = model.get("unk_token")
    return pieces, scores, vocab.get(unk_piece) if unk_piece is not None else None


def sentencepiece_vocab(tokenizer: dict[str, Any], vocab_size: int, where: str) -> SentencePieceVocab:
    """The `tokenizer.ggml.tokens/scores/token_type` arrays of a SentencePiece-style tokenizer.json,
    padded to the model's `vocab_size` rows."""
    pieces, scores, unk = _pieces(tokenizer["model"], where)
    added = {int(entry["id"]): entry for entry in tokenizer.get("added_tokens", [])}
    for token_id, entry in added.items():
        pieces[token_id] = entry["content"]
    size = max(vocab_size, max(pieces, default=-1) + 1)
    tokens: list[str] = []
    token_scores: list[float] = []
    types: list[int] = []
    for token_id in range(size):
        piece = pieces.get(token_id)
        if piece is None:
            tokens.append(f"[PAD{token_id}]")
            token_scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(piece)
        if token_id in added:
            special = bool(added[token_id].get("special", False))
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            if token_id == unk:
                kind = gguf.TokenType.UNKNOWN
            token_scores.append(scores.get(token_id, 0.0 if special else -1000.0))
        else:
            kind = (gguf.TokenType.UNKNOWN if token_id == unk
                    else gguf.TokenType.BYTE if _BYTE_PIECE.fullmatch(piece) else gguf.TokenType.NORMAL)
            token_scores.append(scores.get(token_id, 0.0))
        types.append(int(kind))
    return SentencePieceVocab(tokens, token_scores, types)


def add_space_prefix(tokenizer: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a `▁` before the text (llama.cpp's `add_space_prefix`)."""
    def steps(component: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        if not component:
            return []
        return list(component.get(key) or []) if component.get("type") == "Sequence" else [component]

    for step in steps(tokenizer.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme")
            return scheme != "never" if scheme is not None else bool(step.get("add_prefix_space", True))
    for step in steps(tokenizer.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == _SPACE:
            return True
    return False
