"""compressed-tensors' own path from a weight to its stored tensors, for comparison with ours.

The min/max reductions are what llm-compressor's min-max observer computes (in the weight's
dtype); the scales, zero points, global scale, quantization and packing are compressed-tensors'
functions (`calculate_qparams`, `generate_gparam`, the registered compressors).
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from quantizers import QuantScheme


def ct_scheme(scheme: QuantScheme) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme.weight_args()))


def _observed_min_max(weight: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    if scheme.strategy in ("group", "tensor_group"):
        grouped = weight.unflatten(-1, (columns // scheme.group_size, scheme.group_size))
        return grouped.amin(-1), grouped.amax(-1)
    if scheme.strategy == "channel":
        return weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    bh, bw = scheme.block_structure
    r, c = -(-rows // bh), -(-columns // bw)
    low = torch.empty(r, c, dtype=weight.dtype)
    high = torch.empty(r, c, dtype=weight.dtype)
    for i in range(r):
        for j in range(c):
            tile = weight[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
            low[i, j], high[i, j] = tile.min(), tile.max()
    return low, high


def compress_with_ct(weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    ct = ct_scheme(scheme)
    state: dict[str, torch.Tensor] = {"weight": weight}
    global_scale = None
    if scheme.format == "nvfp4-pack-quantized":
        global_scale = generate_gparam(weight.min(), weight.max())
        state["weight_global_scale"] = global_scale
    low, high = _observed_min_max(weight, scheme)
    scale, zero_point = calculate_qparams(low, high, ct.weights, global_scale=global_scale)
    state["weight_scale"] = scale
    state["weight_zero_point"] = zero_point
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return dict(compressor.compress(state, ct))


def decompress_with_ct(stored: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return compressor.decompress(dict(stored), ct_scheme(scheme))["weight"]
