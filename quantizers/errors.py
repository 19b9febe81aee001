"""Errors raised by the quantizers layer.

One base class, so callers (workers, the CLI) can tell a quantization problem from any other
failure without matching message text.
"""

__all__ = [
    "QuantizationError",
    "UnknownSchemeError",
    "UnknownMethodError",
    "InvalidWeightError",
    "UnsupportedSchemeError",
    "InvalidSourceError",
]


class QuantizationError(Exception):
    """Base class of every error the quantizers raise."""


class UnknownSchemeError(QuantizationError, KeyError):
    """A scheme name that is not in the registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnknownMethodError(QuantizationError, ValueError):
    """A method name (rtn, search, hqq) that is not registered; the message lists the valid ones."""


class InvalidWeightError(QuantizationError, ValueError):
    """A weight that cannot be quantized: wrong rank, empty, NaN/Inf values, wrong dtype."""


class UnsupportedSchemeError(QuantizationError, ValueError):
    """Scheme options that no format can store (e.g. 3-bit packing, asymmetric FP4)."""


class InvalidSourceError(QuantizationError, ValueError):
    """A quantized source tensor whose parts do not fit together (scale shape, dtype, format)."""
