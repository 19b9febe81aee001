"""`search`: per group, search the scale (and integer zero point) that minimise the weighted
squared reconstruction error, as llama.cpp's k-quant quantizers do (make_qx_quants,
make_qkx2_quants), with no calibration data.

For each group, candidate scales s_k = f_k * s_rtn are tried (f_k from 1.03 down to 0.70 in steps
of 0.03: clipping the largest weights is traded against finer steps for the rest). Each
candidate's codes v = round(x / s_k) are scored by the error that the least-squares scale for
those codes would leave, in closed form as llama.cpp does: sum w x^2 - (sum w v x)^2 / sum w v^2
(for asymmetric int, the least-squares line x ~ a v + b, whose slope is the scale and -b/a the zero
point). The best candidate's fitted parameters are rounded to what the format stores (bf16 scale,
integer zero point, E4M3 block scale) and its codes redone by nearest rounding, which can only
lower the error for those parameters. A group keeps RTN's parameters if that final check finds
them better, so no group gets worse than RTN under the weighting.

Weighting: `_grid.magnitude_weights`, rms of the group + |x| (llama.cpp's default without an
importance matrix). Cost: about 6 element-wise passes per candidate, 12 candidates.

Each candidate is one function of the chunk (`_scale_candidate`, `_asymmetric_candidate`), so a
compiled run fuses a candidate's passes into one loop; the candidate factor goes in as a 0-d
tensor, because Dynamo would compile again for every distinct Python float.
"""

from __future__ import annotations

import torch

from quantizers.kernels import maybe_compiled
from quantizers.methods._grid import Grid, magnitude_weights, squared_error

__all__ = ["FACTORS", "PASSES", "scale_only", "asymmetric"]

FACTORS = tuple(round(1.03 - 0.03 * k, 2) for k in range(12))  # 1.03 .. 0.70
PASSES = len(FACTORS) + 2  # one scoring pass per candidate, RTN's and the winner's check


def _factors(device: torch.device) -> list[torch.Tensor]:
    return list(torch.tensor(FACTORS, dtype=torch.float32, device=device).unbind())


def _keep_better(
    x: torch.Tensor, w: torch.Tensor, old: torch.Tensor, new: torch.Tensor
) -> torch.Tensor:
    """Per group, whether the `new` dequantized weight has a lower weighted error than `old`."""
    return squared_error(x, new, w) < squared_error(x, old, w)


def _scale_candidate(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor,
    best_gain: torch.Tensor, best_fit: torch.Tensor, grid: Grid,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the scale `factor` x RTN's: the best (gain, least-squares scale) so far, per group."""
    v = grid.values(x / grid.safe_store(scale * factor, scale))
    wv = w * v
    dot = (wv * x).sum(-1, keepdim=True)
    norm = (wv * v).sum(-1, keepdim=True)
    # Error of the least-squares scale dot/norm for these codes: sum w x^2 - dot^2 / norm.
    gain = torch.nan_to_num(dot * dot / norm, nan=-1.0)
    better = gain > best_gain
    return torch.where(better, gain, best_gain), torch.where(better, dot / norm, best_fit)


def _scale_choice(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, best_fit: torch.Tensor, grid: Grid
) -> torch.Tensor:
    """The winner's fitted scale as stored, or RTN's where that is better after all."""
    chosen = grid.safe_store(best_fit, scale)
    better = _keep_better(x, w, grid.values(x / scale) * scale, grid.values(x / chosen) * chosen)
    return torch.where(better, chosen, scale)


def scale_only(x: torch.Tensor, scale: torch.Tensor, grid: Grid, compiled: bool = False) -> torch.Tensor:
    """x (groups..., size) float32, RTN scale (groups..., 1) -> the searched scale, same shape."""
    w = maybe_compiled(magnitude_weights, 0, compiled)(x)
    candidate = maybe_compiled(_scale_candidate, 0, compiled)
    best_gain = torch.full_like(scale, -1.0)
    best_fit = scale.clone()  # not `scale` itself: Dynamo would guard (and recompile) on the alias
    for factor in _factors(x.device):
        best_gain, best_fit = candidate(x, w, scale, factor, best_gain, best_fit, grid)
    return maybe_compiled(_scale_choice, 0, compiled)(x, w, scale, best_fit, grid)


def _asymmetric_start(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per chunk, what every candidate needs: weights, their sums, sum w x, the low end (<= 0)."""
    w = magnitude_weights(x)
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    return w, w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True), low


def _asymmetric_candidate(
    x: torch.Tensor, w: torch.Tensor, total: torch.Tensor, sum_x: torch.Tensor, low: torch.Tensor,
    scale: torch.Tensor, factor: torch.Tensor, best: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grid: Grid,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score the range `factor` x RTN's: the best (gain, slope, offset) so far, per group."""
    best_gain, best_slope, best_offset = best
    candidate = grid.safe_store(scale * factor, scale)
    # Shrinking the range from both ends: the zero point keeps the low end's share.
    candidate_zero = (grid.q_min - low * factor / candidate).round().clamp(grid.q_min, grid.q_max)
    q = grid.asymmetric_codes(x, candidate, candidate_zero)
    wq = w * q
    sum_q = wq.sum(-1, keepdim=True)
    covariance = (wq * x).sum(-1, keepdim=True) - sum_q * sum_x / total
    variance = (wq * q).sum(-1, keepdim=True) - sum_q * sum_q / total
    # Weighted least squares of x ~ a q + b leaves sum w (x - mean)^2 - cov^2 / var.
    gain = torch.nan_to_num(covariance * covariance / variance, nan=-1.0)
    slope = covariance / variance
    better = gain > best_gain
    return (
        torch.where(better, gain, best_gain),
        torch.where(better, slope, best_slope),
        torch.where(better, (sum_x - slope * sum_q) / total, best_offset),
    )


def _asymmetric_choice(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    best_slope: torch.Tensor, best_offset: torch.Tensor, grid: Grid,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The winner's line as a stored scale and integer zero point, or RTN's where that is better."""
    chosen = grid.safe_store(best_slope, scale)
    chosen_zero = torch.nan_to_num((-best_offset / chosen).round(), nan=0.0).clamp(grid.q_min, grid.q_max)
    better = _keep_better(
        x, w,
        (grid.asymmetric_codes(x, scale, zero) - zero) * scale,
        (grid.asymmetric_codes(x, chosen, chosen_zero) - chosen_zero) * chosen,
    )
    return torch.where(better, chosen, scale), torch.where(better, chosen_zero, zero)


def asymmetric(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid, compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int: x, RTN scale and integer zero point -> searched (scale, zero point)."""
    w, total, sum_x, low = maybe_compiled(_asymmetric_start, 0, compiled)(x)
    candidate = maybe_compiled(_asymmetric_candidate, 0, compiled)
    best = (torch.full_like(scale, -1.0), scale.clone(), -zero * scale)
    for factor in _factors(x.device):
        best = candidate(x, w, total, sum_x, low, scale, factor, best, grid)
    return maybe_compiled(_asymmetric_choice, 0, compiled)(x, w, scale, zero, best[1], best[2], grid)
