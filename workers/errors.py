"""Errors a work unit raises; each names the unit, the tensor and the problem."""

__all__ = ["ConversionError", "TensorQualityError", "UnitFailed"]


class ConversionError(Exception):
    """Base class of the workers layer's errors."""


class TensorQualityError(ConversionError):
    """A quantized tensor failed its quality gate (figures in the message)."""


class UnitFailed(ConversionError):
    """A work unit could not be converted; wraps the cause with the unit and tensor named."""
