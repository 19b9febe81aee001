"""Errors of the model-level evaluation."""

from workers.errors import ConversionError

__all__ = ["EvaluationError"]


class EvaluationError(ConversionError):
    """The models or the text cannot be evaluated (missing tokenizer, model kinds differ, ...)."""
