"""The evaluation text: the built-in one, or a file / URI the user names.

The built-in text is package data (`data/python-reference.txt`, with its licence and checksum
beside it), not code: ten chapters of the Python 3.11 Language Reference, English technical prose
with some code, about 74,000 characters (15,000-20,000 tokens for common tokenizers), fixed so
figures compare run to run and across Python versions. It is read with `importlib.resources`, so
an installed wheel and an editable checkout both find it, and its SHA-256 is checked against the
one pinned here on every read: changing the text changes every evaluation figure.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict

from infra.errors import InfraError
from infra.storage import open_storage, parse_uri
from workers.evaluation.errors import EvaluationError

__all__ = ["EvalText", "load_text", "builtin_text", "DEFAULT_TEXT_NAME", "DEFAULT_TEXT_SHA256",
           "DEFAULT_TEXT_FILE"]

DEFAULT_TEXT_NAME = "python-3.11-language-reference (10 chapters)"
DEFAULT_TEXT_FILE = "data/python-reference.txt"  # inside this package
DEFAULT_TEXT_SHA256 = "ff164dbfe38eba768a7edd8a60cb698cddc0a31fd7855e791bf4b16e1fedcb27"


class EvalText(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sha256: str
    text: str


def builtin_text() -> EvalText:
    """The text shipped with quantfleet, checked against its pinned SHA-256."""
    resource = resources.files(__package__ or "workers.evaluation").joinpath(DEFAULT_TEXT_FILE)
    try:
        data = resource.read_bytes()
    except OSError as error:
        raise EvaluationError(f"the built-in evaluation text {DEFAULT_TEXT_FILE} is not installed "
                              f"with quantfleet: {error}") from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != DEFAULT_TEXT_SHA256:
        raise EvaluationError(f"the built-in evaluation text {resource} has SHA-256 {digest}, not "
                              f"{DEFAULT_TEXT_SHA256}: it was changed; reinstall quantfleet")
    return EvalText(name=DEFAULT_TEXT_NAME, sha256=digest, text=data.decode("utf-8"))


def load_text(location: str | None = None) -> EvalText:
    """The built-in text (None), or the UTF-8 text of a local file, file:// or s3:// object."""
    if location is None:
        return builtin_text()
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
