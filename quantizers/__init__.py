"""quantizers: pure tensor math (no I/O, no Ray, no Prefect) that turns a weight into the tensors
a compressed-tensors checkpoint stores.

    from quantizers import get_scheme, quantize, weight_error
    result = quantize(weight, get_scheme("W4A16"), name="model.layers.0.mlp.up_proj.weight")
    result.tensors          # {"weight_packed": ..., "weight_scale": ..., "weight_shape": ...}
    weight_error(weight, result.dequantized).sqnr_db
"""

from quantizers.config import ConfigGroup, config_groups, quantization_config
from quantizers.errors import (
    InvalidSourceError,
    InvalidWeightError,
    QuantizationError,
    UnknownMethodError,
    UnknownSchemeError,
    UnsupportedSchemeError,
)
from quantizers.methods import METHODS, check_method, method_passes
from quantizers.metrics import WeightError, weight_error
from quantizers.presets import PRESETS, get_scheme, scheme_names
from quantizers.probes import (
    DEFAULT_PROBES,
    estimate_output_error,
    keeps_dequantized,
    output_error,
    probe_vectors,
)
from quantizers.quantize import QuantizedTensors, dequantize, quantize
from quantizers.scheme import QuantScheme
from quantizers.shapes import Resolution, StoredTensorSpec, resolve_scheme, stored_specs

__all__ = [
    "ConfigGroup",
    "DEFAULT_PROBES",
    "METHODS",
    "UnknownMethodError",
    "check_method",
    "method_passes",
    "PRESETS",
    "InvalidSourceError",
    "InvalidWeightError",
    "QuantScheme",
    "QuantizationError",
    "QuantizedTensors",
    "Resolution",
    "StoredTensorSpec",
    "UnknownSchemeError",
    "UnsupportedSchemeError",
    "WeightError",
    "config_groups",
    "dequantize",
    "get_scheme",
    "estimate_output_error",
    "keeps_dequantized",
    "output_error",
    "probe_vectors",
    "quantization_config",
    "quantize",
    "resolve_scheme",
    "scheme_names",
    "stored_specs",
    "weight_error",
]
