"""Refuse before converting what the model-level evaluation after it would refuse.

A conversion that evaluates its result (`--evaluate`, a model-level gate, every `sweep` point)
converts first and evaluates the staged checkpoint at the end: a missing tokenizer or an
unreadable text would then fail only after hours of converting. What the evaluation needs from
the source (a `config.json` and tokenizer files, which are also copied beside the quantized
shards) and the text itself are checked here, from file names and one read of the text, without
importing transformers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath

from infra.storage import Storage
from workers.evaluation.errors import EvaluationError
from workers.evaluation.text import load_text

__all__ = ["check_evaluation_inputs", "is_tokenizer_file"]

# The files transformers' tokenizers load from (fast: tokenizer.json; SentencePiece: *.model;
# WordPiece / BPE: vocab.txt, vocab.json + merges.txt; tiktoken: *.tiktoken). Generous on purpose:
# this check only refuses a checkpoint that clearly has none; tokenizer_config.json alone is none.
_TOKENIZER_NAMES = frozenset({"tokenizer.json", "merges.txt"})
_TOKENIZER_SUFFIXES = (".model", ".tiktoken")
_TOKENIZER_PREFIXES = ("vocab.",)


def is_tokenizer_file(key: str) -> bool:
    name = PurePosixPath(key).name
    return (name in _TOKENIZER_NAMES or name.endswith(_TOKENIZER_SUFFIXES)
            or name.startswith(_TOKENIZER_PREFIXES))


def check_evaluation_inputs(source: Storage, keys: Iterable[str], text: str | None, *,
                            why: str) -> None:
    """Raise `EvaluationError` (one line) if the evaluation `why` names cannot run on `source`
    (`keys`: its objects; only the top-level ones count) or cannot read `text`."""
    names = {key for key in keys if "/" not in key}
    if "config.json" not in names:
        raise EvaluationError(f"{source.uri()}: no config.json, so {why} cannot load the model with "
                              "transformers; add it to the source or drop the evaluation")
    if not any(is_tokenizer_file(name) for name in names):
        raise EvaluationError(
            f"{source.uri()}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.txt, ...), so "
            f"{why} cannot tokenize its text; add them to the source or drop the evaluation")
    try:
        load_text(text)
    except EvaluationError as error:
        raise EvaluationError(f"{error} (needed by {why})") from error
