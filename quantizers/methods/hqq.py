"""`hqq`: Half-Quadratic Quantization (Badri & Shaji, 2023), data-free, per group.

HQQ fits the quantization parameters under an lp loss with p < 1, which treats the few large
residuals (clipped outliers) as a sparse error E instead of letting them drag the fit. It
alternates, per group:

1. codes q = round(x / s + z) (nearest, clamped to the format's range);
2. E = shrink_p(x - (q - z) s): the generalised soft-threshold of the lp proximal step,
   sign(r) * max(|r| - |r|^(p-1) / beta, 0), with r measured in quantization steps (r / s) so one
   setting serves every tensor's magnitude;
3. the parameters by least squares against the de-noised target x - E: the zero point (as the
   reference HQQ does) and, where the format has a free scale, the scale too; then rounded to what
   the format stores (integer zero points for pack-quantized, E4M3 block scales for NVFP4...).

beta starts at 1 (only residuals above one step, i.e. clipped values, count as outliers) and grows
by KAPPA = 1.1 per iteration, p = 0.7 (the lp_norm of the reference), 10 iterations (the reference
runs up to 20 with beta from 10 on raw weights; fewer, larger steps cost half as much here). The
reference keeps the iterate with the lowest mean absolute error; here each group keeps the iterate,
RTN's parameters included, with the lowest squared error, so a group never ends worse than RTN.

Each iteration's element-wise work is one function of the chunk (`_scale_iteration`,
`_asymmetric_iteration`), so a compiled run fuses it into one loop; beta goes in as a 0-d tensor
there, because Dynamo would compile again for every distinct Python float.

On the CPU, integer formats skip the shrink's power where it is zero, a whole group at a time
(`_scale_step_by_groups`, `_asymmetric_step_by_groups`). The power is ~80% of a fused iteration's
time there, yet nearest rounding leaves every element that is not clipped within half a step of its
code, below the shrink's bound (> 0.51 steps), so only groups with a clipped element (none in the
first iteration, under half in the tenth) can have a de-noised target other than x. One pass
(compiled where the plan compiles) takes the error, the fit's sums for target x, and each group's
largest residual; the groups above the bound are then fitted again with the shrink. Same
arithmetic, so the same parameters but for float near-ties. Float formats (FP8, FP4: steps that
grow with the value, so most groups pass) and GPUs (the power is cheap; picking groups would wait
for the device) keep the fused iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from quantizers.kernels import maybe_compiled
from quantizers.methods._grid import Grid

__all__ = ["P", "BETA", "KAPPA", "ITERATIONS", "PASSES", "scale_only", "asymmetric", "shrink"]

P = 0.7
BETA = 1.0
KAPPA = 1.1
ITERATIONS = 10
PASSES = ITERATIONS + 1  # each iteration: one rounding, one shrink and one fit pass
_Step = Callable[..., tuple[torch.Tensor, ...]]  # a step of the iteration, compiled or not
_DENSE_FRACTION = 4  # `shrink` on the CPU: the power on every element once over 1/4 of them need it


def shrink(residual: torch.Tensor, beta: float | torch.Tensor, p: float = P) -> torch.Tensor:
    """The lp (p < 1) proximal operator HQQ uses: sign(r) * relu(|r| - |r|^(p-1) / beta).

    On the CPU the power, ~40% of hqq's time there, is taken only where the result can be nonzero:
    relu(...) is zero wherever |r|^(2-p) <= 1/beta, i.e. |r| <= beta^(-1/(2-p)) (>= 0.51 steps for
    the betas used), which with nearest rounding is every element but the clipped ones. Elements
    below 0.99x that bound get the formula's signed zero directly: the 1.3% margin in
    |r|^(p-1)/beta dwarfs float rounding. On a GPU the power is cheap and a gather would wait for
    the device, so it runs dense there, as it does compiled (one fused loop, no gather).
    """
    if residual.is_cuda or torch.compiler.is_compiling():
        return _shrink_formula(residual, beta, p)
    flat = residual.reshape(-1)
    passing = flat.abs() > _shrink_bound(beta, p)
    if int(passing.sum()) > flat.numel() // _DENSE_FRACTION:
        # FP8's steps grow with the value, so most residuals pass: gathering them costs more than
        # the power it saves.
        return _shrink_formula(residual, beta, p)
    candidates = passing.nonzero().squeeze(1)
    out = torch.sign(flat).mul_(0.0)  # sign(r) * 0: the formula's zeros, signs included
    out.index_copy_(0, candidates, _shrink_formula(flat.index_select(0, candidates), beta, p))
    return out.view(residual.shape)


def _shrink_bound(beta: float | torch.Tensor, p: float = P) -> float | torch.Tensor:
    """The |r| below which `shrink` is zero, less a 1% margin (see `shrink`)."""
    return 0.99 * beta ** (-1.0 / (2.0 - p))


def _shrink_formula(residual: torch.Tensor, beta: float | torch.Tensor, p: float) -> torch.Tensor:
    magnitude = residual.abs()
    return torch.sign(residual) * torch.relu(magnitude - magnitude.clamp(min=1e-12).pow(p - 1) / beta)


def _betas(device: torch.device, compiled: bool) -> list[float] | list[torch.Tensor]:
    """beta for each iteration: Python floats eagerly, 0-d tensors compiled (see the docstring)."""
    betas = [BETA]
    for _ in range(ITERATIONS - 1):
        betas.append(betas[-1] * KAPPA)  # multiplied up, as the iterations always have
    if not compiled:
        return betas
    return list(torch.tensor(betas, dtype=torch.float32, device=device).unbind())


def _squared_sum(residual: torch.Tensor) -> torch.Tensor:
    """Per group (last dim reduced, kept): the sum of squared residuals."""
    return (residual * residual).sum(-1, keepdim=True)


def _scale_codes(x: torch.Tensor, scale: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest values for `scale`, and the residual they leave."""
    v = grid.values(x / scale)
    return v, x - v * scale


def _scale_error(x: torch.Tensor, current: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per group, the squared error of `current` with nearest codes: the iterate to beat."""
    return _squared_sum(_scale_codes(x, current, grid)[1])


def _scale_iteration(
    x: torch.Tensor, current: torch.Tensor, beta: float | torch.Tensor, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """`current`'s error, and the next iterate: the least-squares scale for the de-noised target."""
    v, residual = _scale_codes(x, current, grid)
    error = _squared_sum(residual)
    target = x - shrink(residual / current, beta) * current
    fitted = (v * target).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True)
    return error, grid.safe_store(fitted, current)


def _by_groups(x: torch.Tensor, grid: Grid) -> bool:
    """Whether an iteration fits the shrink's groups apart (see the module docstring)."""
    return grid.integer and not x.is_cuda


def _outlier_groups(largest: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Flat indices of the groups whose largest |residual| (in steps) is above the shrink's bound:
    the only groups whose de-noised target is not x itself."""
    return (largest.reshape(-1) > _shrink_bound(beta)).nonzero().squeeze(1)


def _select_groups(t: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(rows, groups, n) -> (len(groups), n): the groups at those flat indices."""
    return t.reshape(-1, t.shape[-1]).index_select(0, groups)


def _replace_groups(t: torch.Tensor, groups: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `t` with the groups at those flat indices replaced by `values` (one row each)."""
    return t.reshape(-1, t.shape[-1]).index_copy(0, groups, values).view(t.shape)


def _scale_sums(
    x: torch.Tensor, current: torch.Tensor, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`current`'s error, the least-squares sums (v x) and (v v) as if the target were x, and each
    group's largest |residual| in steps."""
    v, residual = _scale_codes(x, current, grid)
    error = _squared_sum(residual)
    largest = (residual / current).abs().amax(-1, keepdim=True)
    return error, (v * x).sum(-1, keepdim=True), (v * v).sum(-1, keepdim=True), largest


def _scale_step_by_groups(
    x: torch.Tensor, current: torch.Tensor, beta: float | torch.Tensor, grid: Grid, sums: _Step
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_scale_iteration`'s result, the shrink taken only in the groups where it can be nonzero."""
    error, sum_vt, sum_vv, largest = sums(x, current, grid)
    groups = _outlier_groups(largest, beta)
    if groups.numel():
        xs, scales = _select_groups(x, groups), _select_groups(current, groups)
        v, residual = _scale_codes(xs, scales, grid)
        target = xs - shrink(residual / scales, beta) * scales
        sum_vt = _replace_groups(sum_vt, groups, (v * target).sum(-1, keepdim=True))
    return error, grid.safe_store(sum_vt / sum_vv, current)


def _keep_lower(
    error: torch.Tensor, params: tuple[torch.Tensor, ...],
    best: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Per group, (error, parameters) of whichever iterate has the lower error: `best` or this one."""
    if best is None:
        return error, params
    best_error, best_params = best
    better = error < best_error
    kept = tuple(torch.where(better, new, old) for new, old in zip(params, best_params, strict=True))
    return torch.where(better, error, best_error), kept


def scale_only(x: torch.Tensor, scale: torch.Tensor, grid: Grid, compiled: bool = False) -> torch.Tensor:
    """Formats with no zero point (symmetric int, FP8, FP4): HQQ on the scale alone."""
    iteration: _Step
    if _by_groups(x, grid):
        iteration = partial(_scale_step_by_groups, sums=maybe_compiled(_scale_sums, 0, compiled))
    else:
        iteration = maybe_compiled(_scale_iteration, 0, compiled)
    best = None
    current = scale
    for beta in _betas(x.device, compiled):
        error, following = iteration(x, current, beta, grid)
        best = _keep_lower(error, (current,), best)
        current = following
    error = maybe_compiled(_scale_error, 0, compiled)(x, current, grid)
    return _keep_lower(error, (current,), best)[1][0]


def _asymmetric_codes(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes for (scale, zero point), and the residual they leave."""
    q = grid.asymmetric_codes(x, scale, zero)
    return q, x - (q - zero) * scale


def _asymmetric_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    return _squared_sum(_asymmetric_codes(x, scale, zero, grid)[1])


def _asymmetric_iteration(
    x: torch.Tensor, current: torch.Tensor, current_zero: torch.Tensor, beta: float | torch.Tensor,
    grid: Grid,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, zero point)'s error, and the next iterate: the least-squares line for the de-noised
    target, its slope the scale and -offset / slope the (integer) zero point."""
    q, residual = _asymmetric_codes(x, current, current_zero, grid)
    error = _squared_sum(residual)
    target = x - shrink(residual / current, beta) * current
    mean_q = q.mean(-1, keepdim=True)
    centred = q - mean_q
    return error, *_line_fit(
        mean_q, (centred * centred).sum(-1, keepdim=True), (centred * target).sum(-1, keepdim=True),
        target.mean(-1, keepdim=True), current, grid,
    )


def _line_fit(
    mean_q: torch.Tensor, sum_cc: torch.Tensor, sum_ct: torch.Tensor, mean_t: torch.Tensor,
    current: torch.Tensor, grid: Grid,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares line of target against codes, from its sums (c: codes less their mean)."""
    following = grid.safe_store(sum_ct / sum_cc, current)
    following_zero = torch.nan_to_num((mean_q - mean_t / following).round(), nan=0.0)
    return following, following_zero.clamp(grid.q_min, grid.q_max)


def _asymmetric_sums(
    x: torch.Tensor, current: torch.Tensor, current_zero: torch.Tensor, grid: Grid
) -> tuple[torch.Tensor, ...]:
    """(scale, zero point)'s error; the line fit's sums as if the target were x (mean code, codes'
    spread, codes against x, mean x); and each group's largest |residual| in steps."""
    q, residual = _asymmetric_codes(x, current, current_zero, grid)
    error = _squared_sum(residual)
    mean_q = q.mean(-1, keepdim=True)
    centred = q - mean_q
    largest = (residual / current).abs().amax(-1, keepdim=True)
    return (error, mean_q, (centred * centred).sum(-1, keepdim=True), (centred * x).sum(-1, keepdim=True),
            x.mean(-1, keepdim=True), largest)


def _asymmetric_step_by_groups(
    x: torch.Tensor, current: torch.Tensor, current_zero: torch.Tensor, beta: float | torch.Tensor,
    grid: Grid, sums: _Step,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_asymmetric_iteration`'s result, the shrink taken only where it can be nonzero."""
    error, mean_q, sum_cc, sum_ct, mean_t, largest = sums(x, current, current_zero, grid)
    groups = _outlier_groups(largest, beta)
    if groups.numel():
        xs, scales = _select_groups(x, groups), _select_groups(current, groups)
        q, residual = _asymmetric_codes(xs, scales, _select_groups(current_zero, groups), grid)
        target = xs - shrink(residual / scales, beta) * scales
        centred = q - _select_groups(mean_q, groups)
        sum_ct = _replace_groups(sum_ct, groups, (centred * target).sum(-1, keepdim=True))
        mean_t = _replace_groups(mean_t, groups, target.mean(-1, keepdim=True))
    return error, *_line_fit(mean_q, sum_cc, sum_ct, mean_t, current, grid)


def asymmetric(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid, compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int: HQQ on the zero point and the scale; the zero point stays an integer."""
    iteration: _Step
    if _by_groups(x, grid):
        iteration = partial(_asymmetric_step_by_groups, sums=maybe_compiled(_asymmetric_sums, 0, compiled))
    else:
        iteration = maybe_compiled(_asymmetric_iteration, 0, compiled)
    best = None
    current, current_zero = scale, zero
    for beta in _betas(x.device, compiled):
        error, following, following_zero = iteration(x, current, current_zero, beta, grid)
        best = _keep_lower(error, (current, current_zero), best)
        current, current_zero = following, following_zero
    error = maybe_compiled(_asymmetric_error, 0, compiled)(x, current, current_zero, grid)
    best_scale, best_zero = _keep_lower(error, (current, current_zero), best)[1]
    return best_scale, best_zero
