"""The evaluation text: the built-in one, or a file / URI the user names."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict

from infra.errors import InfraError
from infra.storage import open_storage, parse_uri
from workers.evaluation.default_text import TEXT, TEXT_NAME, TEXT_SHA256
from workers.evaluation.errors import EvaluationError

__all__ = ["EvalText", "load_text", "DEFAULT_TEXT_NAME"]

DEFAULT_TEXT_NAME = TEXT_NAME


class EvalText(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sha256: str
    text: str


def load_text(location: str | None = None) -> EvalText:
    """The built-in text (None), or the UTF-8 text of a local file, file:// or s3:// object."""
    if location is None:
        return EvalText(name=TEXT_NAME, sha256=TEXT_SHA256, text=TEXT)
    try:
        parsed = parse_uri(location)
        key = parsed.path.rpartition("/")[2]
        if parsed.scheme == "file":
            data = Path(parsed.path).read_bytes()
        elif not key:
            raise EvaluationError(f"{location}: names a bucket; the evaluation text must be an object")
        else:
            data = open_storage(str(parsed).removesuffix("/" + key)).read_bytes(key)
    except (InfraError, OSError) as error:
        raise EvaluationError(f"{location}: cannot read the evaluation text: {error}") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EvaluationError(f"{location}: the evaluation text is not UTF-8: {error}") from error
    if not text.strip():
        raise EvaluationError(f"{location}: the evaluation text is empty")
    return EvalText(name=PurePosixPath(key).name, sha256=hashlib.sha256(data).hexdigest(), text=text)
