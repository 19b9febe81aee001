"""llama.cpp's k-quants Q4_K, Q5_K and Q6_K: super-blocks of 256 weights, vectorised across blocks.

Written from the published block format and the reference algorithm in ggml-quants.c
(`quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`, `quantize_row_q6_K_ref` with their helpers
`make_qkx2_quants` and `make_qx_quants`; no importance matrix), so the bytes are the ones
`llama-quantize` writes for the same float input:

- Q4_K (144 bytes / 256 weights = 4.5 bpw): d, dmin (fp16); 12 bytes of eight 6-bit sub-block
  scales and mins; 128 bytes of 4-bit codes. x = d * sc_j * q - dmin * m_j over 8 sub-blocks of 32.
- Q5_K (176 bytes, 5.5 bpw): as Q4_K, plus 32 bytes holding each code's fifth bit.
- Q6_K (210 bytes, 6.5625 bpw): 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 sub-block
  scales, d (fp16). x = d * sc_j * (q - 32) over 16 sub-blocks of 16.

Every block's search runs at once: sub-blocks are the columns of a (length, sub-blocks) tensor,
and each candidate scale is tried for all of them; sums are accumulated in the C loop's order
(`_ops.ordered_sum`) because the choice between candidates compares float32 sums.
"""

from __future__ import annotations

import numpy as np
import torch

from quantizers.gguf._ops import div as _div
from quantizers.gguf._ops import fp16_bytes, fp16_round, nearest_int, ordered_sum

__all__ = ["quantize_q4_k", "quantize_q5_k", "quantize_q6_k", "SUPER_BLOCK"]

SUPER_BLOCK = 256
_GROUP_MAX_EPS = 1e-15


def _f32(value: float) -> float:
    """A C float expression's value: the float32 rounding of `value`."""
    return float(np.float32(value))


def _make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric scale/min search (`make_qkx2_quants`, use_mad false) for every column at once.

    x, weights: (n, blocks) float32. Returns scale (blocks,), the negated min (blocks,) and the
    codes (n, blocks) int32 the search settled on.
    """
    low = x.amin(dim=0).clamp(max=0)  # C: if (min > 0) min = 0
    high = x.amax(dim=0)
    flat = high == low
    sum_w = ordered_sum(weights)
    sum_x = ordered_sum(weights * x)
    # C starts sum_w at w[0] (not 0 + w[0]); identical except for a -0.0, which no branch sees.
    spread = torch.where(flat, 1.0, high - low)
    iscale = _div(nmax, spread)
    scale = _div(1.0, iscale)
    codes = nearest_int(iscale * (x - low)).clamp(0, nmax)
    best_error = ordered_sum(weights * (scale * codes + low - x).square())
    minimum = low
    for step in range(nstep + 1):
        factor = _f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax)  # float parameters in C
        # C updates `min` in place when a trial wins, so later trials start from the new one.
        trial_iscale = _div(factor, torch.where(flat, 1.0, high - minimum))
        trial = nearest_int(trial_iscale * (x - minimum)).clamp(0, nmax)
        trial_f = trial.float()
        weighted = weights * trial_f
        sum_l = ordered_sum(weighted)
        sum_l2 = ordered_sum(weighted * trial_f)
        sum_xl = ordered_sum(weighted * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        usable = det > 0
        safe_det = torch.where(usable, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        error = ordered_sum(weights * (this_scale * trial_f + this_min - x).square())
        better = usable & (error < best_error)
        codes = torch.where(better, trial, codes)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    scale = torch.where(flat, 0.0, scale)
    codes = torch.where(flat, 0, codes)
    minimum = torch.where(flat, low, minimum)
    return scale, -minimum, codes


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale search (`make_qx_quants`, rmse_type 1: weights x^2) for every column.

    x: (n, blocks) float32. Returns scale (blocks,) and codes (n, blocks) int32 in [0, 2 nmax).
    """
    magnitude = x.abs()
    pick = magnitude.argmax(dim=0, keepdim=True)  # first largest |x|, as the C loop's strict >
    amax = magnitude.gather(0, pick)[0]
    signed_max = x.gather(0, pick)[0]
    zero = amax < _GROUP_MAX_EPS
    signed_max = torch.where(zero, 1.0, signed_max)
    weights = x * x
    weighted_x = weights * x

    def attempt(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        as_float = levels.float()
        sum_lx = ordered_sum(weighted_x * as_float)
        sum_l2 = ordered_sum(weights * as_float * as_float)
        return levels + nmax, sum_lx, sum_l2

    codes, sum_lx, sum_l2 = attempt(_div(-nmax, signed_max))
    scale = torch.where(sum_l2 != 0, sum_lx / torch.where(sum_l2 != 0, sum_l2, 1.0), 0.0)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        factor = -_f32(nmax + _f32(_f32(0.1) * step))
        trial, sum_lx, sum_l2 = attempt(_div(factor, signed_max))
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        codes = torch.where(better, trial, codes)
        scale = torch.where(better, sum_lx / torch.where(sum_l2 != 0, sum_l2, 1.0), scale)
        best = torch.where(better, scale * sum_lx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, codes)


def _scale_min_k(
    weight: torch.Tensor, nmax: int, rmin: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q4_K/Q5_K super-block search. Returns d, dmin (float32, (blocks,)), the 6-bit scales
    and mins (int32, (blocks, 8)) and the codes (int32, (blocks, 256))."""
    sub = weight.float().reshape(-1, 32)  # (blocks * 8, 32)
    x = sub.t().contiguous()  # (32, blocks * 8): one column per sub-block
    sum_x2 = ordered_sum(x * x)
    # torch's float32 sqrt is not always correctly rounded (sqrtf is); via float64 it is.
    average = torch.sqrt(_div(sum_x2, 32).double()).float()
    weights = average + x.abs()
    scales, mins, codes = _make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep)
    scales = scales.reshape(-1, 8)
    mins = mins.reshape(-1, 8)
    # C's running max starts at +0.0; `+ 0.0` turns a -0.0 (a min of exactly 0) into it.
    max_scale = scales.amax(dim=1).clamp(min=0) + 0.0
    max_min = mins.amax(dim=1).clamp(min=0) + 0.0
    inv_scale = torch.where(max_scale > 0, _div(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, _div(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    # C stores nearest_int(...) in a uint8 before MIN(63, .): wrap first, then cap.
    levels = (nearest_int(inv_scale[:, None] * scales) & 255).clamp(max=63)
    level_mins = (nearest_int(inv_min[:, None] * mins) & 255).clamp(max=63)
    d = _div(max_scale, 63.0)
    dmin = _div(max_min, 63.0)
    step = fp16_round(d)[:, None] * levels.float()  # (blocks, 8)
    offset = fp16_round(dmin)[:, None] * level_mins.float()
    grouped = weight.float().reshape(-1, 8, 32)
    safe = torch.where(step != 0, step, 1.0)[..., None]
    requantized = nearest_int((grouped + offset[..., None]) / safe).clamp(0, nmax)
    searched = codes.t().reshape(-1, 8, 32)
    # C skips a sub-block whose step is 0 and keeps the search's codes for it.
    final = torch.where((step != 0)[..., None], requantized, searched)
    return d, dmin, levels, level_mins, final.reshape(-1, SUPER_BLOCK)


def _pack_scales_k4(levels: torch.Tensor, level_mins: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> 12 bytes (the layout `get_scale_min_k4` reads)."""
    low_s, high_s = levels[:, :4], levels[:, 4:]
    low_m, high_m = level_mins[:, :4], level_mins[:, 4:]
    packed = torch.cat(
        (
            low_s | ((high_s >> 4) << 6),
            low_m | ((high_m >> 4) << 6),
            (high_s & 15) | ((high_m & 15) << 4),
        ),
        dim=1,
    )
    return packed.to(torch.uint8)


def _check(weight: torch.Tensor) -> tuple[int, int]:
    rows, cols = weight.shape
    if cols % SUPER_BLOCK:
        raise ValueError(f"k-quants need rows that are a multiple of {SUPER_BLOCK} weights (got {cols})")
    return rows, cols


def quantize_q4_k(weight: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weight, cols % 256 == 0 -> (rows, cols / 256 * 144) uint8 Q4_K blocks."""
    rows, cols = _check(weight)
    d, dmin, levels, level_mins, codes = _scale_min_k(weight, 15, -1.0, 20)
    halves = codes.reshape(-1, 4, 2, 32)  # 64-weight chunks: first 32 low nibbles, next 32 high
    qs = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    blocks = torch.cat((fp16_bytes(d), fp16_bytes(dmin), _pack_scales_k4(levels, level_mins), qs), dim=1)
    return blocks.reshape(rows, cols // SUPER_BLOCK * 144)


def quantize_q5_k(weight: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weight, cols % 256 == 0 -> (rows, cols / 256 * 176) uint8 Q5_K blocks."""
    rows, cols = _check(weight)
    d, dmin, levels, level_mins, codes = _scale_min_k(weight, 31, -0.5, 15)
    chunks = codes.reshape(-1, 4, 2, 32)  # (blocks, chunk k, half h, 32)
    low = chunks & 15
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    # The fifth bit of weight (k, h, j) goes to bit 2k + h of qh[j].
    shifts = torch.arange(8, device=codes.device, dtype=torch.int32).reshape(1, 4, 2, 1)
    qh = ((chunks >> 4) << shifts).sum(dim=(1, 2)).to(torch.uint8)  # (blocks, 32), disjoint bits
    blocks = torch.cat(
        (fp16_bytes(d), fp16_bytes(dmin), _pack_scales_k4(levels, level_mins), qh, qs), dim=1
    )
    return blocks.reshape(rows, cols // SUPER_BLOCK * 176)


def quantize_q6_k(weight: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weight, cols % 256 == 0 -> (rows, cols / 256 * 210) uint8 Q6_K blocks."""
    rows, cols = _check(weight)
    sub = weight.float().reshape(-1, 16)  # (blocks * 16, 16)
    scales, codes = _make_qx_quants(sub.t().contiguous(), 32)
    scales = scales.reshape(-1, 16)  # (blocks, 16)
    pick = scales.abs().argmax(dim=1, keepdim=True)
    max_abs = scales.abs().gather(1, pick)[:, 0]
    max_scale = scales.gather(1, pick)[:, 0]
    empty = max_abs < _GROUP_MAX_EPS
    iscale = _div(-128.0, torch.where(empty, 1.0, max_scale))
    d = _div(1.0, iscale)
    levels = nearest_int(iscale[:, None] * scales).clamp(max=127)  # (blocks, 16) int8 range
    step = fp16_round(d)[:, None] * levels.float()
    grouped = weight.float().reshape(-1, 16, 16)
    requantized = nearest_int(grouped / torch.where(step != 0, step, 1.0)[..., None]).clamp(-32, 31) + 32
    searched = codes.t().reshape(-1, 16, 16)
    final = torch.where((step != 0)[..., None], requantized, searched).reshape(-1, 2, 4, 32)
    low = final & 15
    high = final >> 4
    ql = torch.cat((low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)), dim=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    blocks = torch.cat(
        (
            ql.reshape(-1, 128).to(torch.uint8),
            qh.reshape(-1, 64).to(torch.uint8),
            levels.to(torch.int8).view(torch.uint8),
            fp16_bytes(d),
        ),
        dim=1,
    )
    blocks = torch.where(empty[:, None], 0, blocks).to(torch.uint8)  # C: memset the block to 0
    return blocks.reshape(rows, cols // SUPER_BLOCK * 210)
