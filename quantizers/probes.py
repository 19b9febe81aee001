"""Data-free output error of a quantized Linear: ||W X - W' X|| / ||W X|| on fixed random probes.

A checkpoint too big to run can still be checked layer by layer: each Linear's output on a fixed
set of random probe vectors X (one column per probe) is compared with the original's. The probes
are standard Gaussian, generated on the CPU from a fixed seed and the input width, so every run,
worker and device sees the same X for the same shape.

For isotropic probes E||D x||^2 = ||D||_F^2, so the figure estimates the relative Frobenius error
of the weight, measured through the layer the way activations see it (column-wise error that
cancels across a row counts less than error that adds up). It is a per-layer figure: how well it
predicts model-level KL divergence is measured by `quantfleet sweep` on models that fit.

Computed in row chunks in float32, so at most one chunk's float copies exist at a time. On the
CPU a chunk is small enough (1 MiB of float32) that its copies stay in cache between being
written and multiplied: with 16 MiB chunks the probes of a 4096x4096 weight took 3-4x longer.
On a GPU chunks are large, to launch few kernels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from quantizers.quantize import QuantizedTensors, quantize
from quantizers.scheme import QuantScheme

__all__ = [
    "DEFAULT_PROBES",
    "PROBE_SEED",
    "SAMPLE_ROWS",
    "estimate_output_error",
    "keeps_dequantized",
    "output_error",
    "probe_vectors",
    "sampled_rows",
]

DEFAULT_PROBES = 16
PROBE_SEED = 20240611
_CHUNK_ELEMENTS = 1 << 22  # on accelerators
_CPU_CHUNK_ELEMENTS = 1 << 18


@lru_cache(maxsize=64)
def _cpu_probes(in_features: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + in_features)
    return torch.randn(in_features, count, generator=generator, dtype=torch.float32)  # [in, count]


def probe_vectors(
    in_features: int,
    count: int = DEFAULT_PROBES,
    *,
    seed: int = PROBE_SEED,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The fixed probes for an input width: float32 [in_features, count], same on every device."""
    if in_features < 1 or count < 1:
        raise ValueError(f"need in_features >= 1 and count >= 1, got {in_features} and {count}")
    return _cpu_probes(in_features, count, seed).to(device)


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, probes: torch.Tensor) -> float:
    """||(W - W') X||_F / ||W X||_F for a 2-D weight [out, in] and probes [in, count].

    0.0 when identical; inf when W X is zero but the outputs differ.
    """
    if weight.dim() != 2 or weight.shape != dequantized.shape:
        raise ValueError(
            f"need two same-shaped 2-D weights, got {list(weight.shape)} and {list(dequantized.shape)}"
        )
    if probes.dim() != 2 or probes.shape[0] != weight.shape[1]:
        raise ValueError(f"probes {list(probes.shape)} do not match weight input width {weight.shape[1]}")
    probes = probes.to(device=weight.device, dtype=torch.float32)
    chunk = _CPU_CHUNK_ELEMENTS if weight.device.type == "cpu" else _CHUNK_ELEMENTS
    rows = max(1, chunk // max(1, weight.shape[1]))
    signal = torch.zeros((), dtype=torch.float64, device=weight.device)
    noise = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        a = weight[start : start + rows].float()  # [rows, in]
        b = dequantized[start : start + rows].float()
        out = a @ probes  # [rows, count]
        diff = out - b @ probes  # float32 keeps ~1e-7 relative: far below any error of interest
        signal += out.double().square().sum()
        noise += diff.double().square().sum()
    noise_sum, signal_sum = float(noise), float(signal)  # one read-back each, after the loop
    if noise_sum == 0.0:
        return 0.0
    if signal_sum == 0.0:
        return math.inf
    return math.sqrt(noise_sum / signal_sum)


# Rows sampled for the estimate on large weights: whole 128-row blocks (FP8_BLOCK's tile height),
# spread evenly over the weight, up to this many rows.
SAMPLE_ROWS = 1024
_ROW_BLOCK = 128


def sampled_rows(rows: int, budget: int = SAMPLE_ROWS) -> list[slice]:
    """Evenly spaced whole 128-row blocks covering about `budget` rows (all rows if fewer)."""
    if rows <= budget:
        return [slice(0, rows)]
    blocks = (rows + _ROW_BLOCK - 1) // _ROW_BLOCK
    wanted = max(1, budget // _ROW_BLOCK)
    picks = sorted({(i * blocks) // wanted for i in range(wanted)})
    return [slice(b * _ROW_BLOCK, min(rows, (b + 1) * _ROW_BLOCK)) for b in picks]


# Up to this many elements (32 MiB of bf16) the probes use the conversion's own dequantized weight
# (kept by its quantization kernel) rather than quantizing a sample again: one weight-sized copy
# while the tensor is in flight, small next to a unit's read and write budgets.
KEEP_DEQUANTIZED_ELEMENTS = 1 << 24


def keeps_dequantized(shape: tuple[int, ...], budget: int = SAMPLE_ROWS) -> bool:
    """Whether the probes of a weight of `shape` want its quantization to keep the dequantized
    weight (`quantize(..., keep_dequantized=True)`): when every row is probed anyway, or when the
    weight is small enough that the copy costs less than quantizing the sampled rows again."""
    rows = shape[0]
    return rows <= budget or rows * shape[1] <= KEEP_DEQUANTIZED_ELEMENTS


def estimate_output_error(
    weight: torch.Tensor,
    scheme: QuantScheme,
    probes: torch.Tensor,
    *,
    budget: int = SAMPLE_ROWS,
    method: str = "rtn",
    quantized: QuantizedTensors | None = None,
) -> float:
    """`output_error` of quantizing `weight` with `scheme` (and `method`), measured on sampled rows.

    `quantized` is the weight's own quantization, when the caller has it: where it holds its
    dequantized weight (`quantize(..., keep_dequantized=True)`), the sampled rows are taken from
    it, and where the sample is the whole weight (at most `budget` rows, as most MoE experts) it is
    dequantized; either way instead of quantizing again, which would cost as much as the
    conversion itself. Otherwise the sample is quantized on its own, and its quantization kernel
    keeps the dequantized rows (no separate dequantizing pass).

    Every scheme quantizes rows independently given the tensor-wide NVFP4 global scale and whole
    FP8 tiles, so re-quantizing a sample of whole 128-row blocks (with the full tensor's absmax)
    gives exactly those rows of the full result. Rows of W X are independent outputs, so the
    ratio over a spread-out sample estimates the layer's figure at a fraction of the cost of
    dequantizing and multiplying the whole weight.
    """
    picks = sampled_rows(weight.shape[0], budget)
    whole = len(picks) == 1 and picks[0] == slice(0, weight.shape[0])
    if quantized is not None and (whole or quantized.holds_dequantized):
        dequantized = quantized.dequantized
        if whole:
            return output_error(weight, dequantized, probes)
        return output_error(_rows(weight, picks), _rows(dequantized, picks), probes)
    sample = weight if whole else _rows(weight, picks)
    # Only NVFP4 has a tensor-wide scale; for the others the two passes over the weight are waste.
    absmax = None
    if scheme.format == "nvfp4-pack-quantized":
        absmax = torch.maximum(-weight.amin(), weight.amax())
    result = quantize(sample, scheme, global_absmax=absmax, method=method, keep_dequantized=True)
    return output_error(sample, result.dequantized, probes)


def _rows(tensor: torch.Tensor, picks: list[slice]) -> torch.Tensor:
    return torch.cat([tensor[s] for s in picks])
