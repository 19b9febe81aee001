"""`quantfleet sweep`: one model, several schemes, the bits-per-weight vs KL chart users read.

Each scheme is converted into OUT/<scheme>/ (a published conversion already there is reused, so
an interrupted sweep resumes), then evaluated against the original on the same text. The sweep
writes sweep.json, sweep.md, sweep.png (bits per weight against mean KL divergence, log scale,
one point per scheme, the table beside it) and correlation.png: how well the data-free per-layer
probe error, which the workers measure on any model, predicts the model-level figure, so users
know how far to trust it on a model too big to evaluate.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flows.charts import scatter_chart
from flows.destination import check_destination
from flows.eval_inputs import check_evaluation_inputs
from flows.finalize import MANIFEST_NAME
from flows.published import check_published_request, check_same_source, current_identity
from flows.recipe import Recipe
from flows.source_eval import source_model
from infra.storage import open_storage
from workers.evaluation import Evaluation
from workers.records import TensorRecord

__all__ = ["SweepPoint", "SweepResult", "run_sweep", "sweep_markdown", "sweep_recipes", "SWEEP_FILES"]

_log = logging.getLogger(__name__)
SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png", "correlation.png")


class SweepPoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: str
    dest_uri: str
    bits_per_weight: float | None  # quantized tensors, scales included
    bits_per_weight_all: float | None  # the whole checkpoint
    bytes_out: int
    probe_error_rms: float | None  # RMS over quantized Linears of the probe output error
    probe_error_max: float | None
    evaluation: Evaluation

    @property
    def quality(self) -> float:
        """The y of the charts: mean KL (causal LMs) or 1 - pooled embedding cosine (encoders)."""
        e = self.evaluation
        if e.kind == "causal-lm":
            return e.mean_kl if e.mean_kl is not None else math.nan
        return 1.0 - e.embedding_cosine if e.embedding_cosine is not None else math.nan


class SweepResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    kind: str
    text: str
    tokens: int
    points: tuple[SweepPoint, ...]
    log_correlation: float | None  # Pearson r of log(probe error RMS) vs log(quality)
    rank_correlation: float | None  # Spearman rho of the same
    fit_exponent: float | None  # quality ~ a * probe_error ^ exponent
    fit_factor: float | None


def _rms(values: Sequence[float]) -> float | None:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else None


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


_Stats = tuple[float | None, float | None, float | None, float | None]


def _correlation(points: Sequence[SweepPoint]) -> _Stats:
    usable = [(p.probe_error_rms, p.quality) for p in points
              if p.probe_error_rms and p.probe_error_rms > 0 and math.isfinite(p.quality) and p.quality > 0]
    xs = [math.log(x) for x, _ in usable if x is not None]
    ys = [math.log(y) for _, y in usable]
    pearson = _pearson(xs, ys)
    spearman = _pearson(_ranks(xs), _ranks(ys))
    if len(xs) < 2:
        return pearson, spearman, None, None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return pearson, spearman, None, None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return pearson, spearman, slope, math.exp(my - slope * mx)


def _point(scheme: str, dest_uri: str, evaluation: Evaluation) -> SweepPoint:
    data = json.loads(open_storage(dest_uri).read_bytes(MANIFEST_NAME))
    tensors = [TensorRecord.model_validate(t) for t in data["tensors"]]
    errors = [t.output_error for t in tensors if t.scheme is not None and t.output_error is not None]
    bpw = data["totals"].get("bits_per_weight", {})
    return SweepPoint(
        scheme=scheme, dest_uri=dest_uri, bits_per_weight=bpw.get("quantized"),
        bits_per_weight_all=bpw.get("all"), bytes_out=data["totals"]["bytes_out"],
        probe_error_rms=_rms(errors), probe_error_max=max(errors, default=None), evaluation=evaluation,
    )


def run_sweep(
    model: str,
    schemes: Sequence[str],
    out_dir: str | Path,
    *,
    text: str | None = None,
    max_tokens: int = 8192,
    context: int = 512,
    shard_size: int = 5_000_000_000,
    ray_address: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    on_point: Callable[[SweepPoint], None] | None = None,
    methods: Sequence[str] = ("rtn",),
    budgets: Sequence[float] = (),
) -> SweepResult:
    """Convert `model` with every scheme under `out_dir`, evaluate each, and write the charts.

    Each scheme is converted with each of `methods` (points named SCHEME, SCHEME-SEARCH, ...), and
    each of `budgets` adds a mixed-precision point (MIXED-<bits>BITS, flows.mixed; candidates with
    the first method), so the chart shows the whole bits-vs-quality curve.
    """
    from flows.pipeline import run_conversion
    from workers.evaluation.evaluate import evaluate

    points_to_run = sweep_recipes(schemes, methods, budgets)  # unknown names fail before any work
    schemes = [label for label, _ in points_to_run]
    recipes = [recipe for _, recipe in points_to_run]
    check_destination(model, str(out_dir))  # OUT/<SCHEME>/ versions and sweep.* only, apart from MODEL
    original_source = source_model(model)  # a quantized MODEL is compared as the dense model it means
    source = open_storage(model)
    # Each point is evaluated after converting it: refuse before the first conversion instead.
    check_evaluation_inputs(source, (info.key for info in source.list("")), text, why="sweep")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    identity = ""  # the model's, once a published point is to be reused
    for scheme, recipe in zip(schemes, recipes, strict=True):
        dest = out / scheme.upper()
        # A point of an earlier sweep of this model is reused; another model's, or one converted
        # from an earlier state of this one, is refused (its figures would be charted as this one's).
        published = check_published_request(str(dest), model, recipe)
        if published is not None:
            identity = identity or current_identity(model)  # read once for every reused point
            check_same_source(published, identity, model)
            _log.info("%s: already converted at %s; reusing it", scheme, dest)
        else:
            run_conversion(model, str(dest), recipe, shard_size=shard_size, ray_address=ray_address,
                           device=device)
        evaluation = evaluate(model, str(dest), text=text, max_tokens=max_tokens, context=context,
                              device=device, dtype=dtype, original_source=original_source)
        point = _point(scheme.upper(), open_storage(dest).uri(), evaluation)
        points.append(point)
        if on_point is not None:
            on_point(point)
    pearson, spearman, exponent, factor = _correlation(points)
    first = points[0].evaluation
    result = SweepResult(
        model=model, kind=first.kind, text=first.text, tokens=first.tokens, points=tuple(points),
        log_correlation=pearson, rank_correlation=spearman, fit_exponent=exponent, fit_factor=factor,
    )
    _write(result, out)
    return result


def sweep_recipes(
    schemes: Sequence[str], methods: Sequence[str] = ("rtn",), budgets: Sequence[float] = ()
) -> list[tuple[str, Recipe]]:
    """(point label, recipe) of every point of a sweep: each scheme x method, then each budget."""
    points = []
    for scheme in schemes:
        for method in methods:
            recipe = Recipe.preset(scheme, method=method)
            label = scheme.upper() if recipe.method == "rtn" else f"{scheme.upper()}-{recipe.method.upper()}"
            points.append((label, recipe))
    for bits in budgets:
        recipe = Recipe.preset("W4A16", method=methods[0] if methods else "rtn", target_bits=bits)
        suffix = "" if recipe.method == "rtn" else f"-{recipe.method.upper()}"
        points.append((f"MIXED-{bits:g}BITS{suffix}", recipe))
    return points


def _quality_label(kind: str) -> str:
    return "mean KL divergence" if kind == "causal-lm" else "1 - pooled embedding cosine"


def _table(result: SweepResult) -> list[list[str]]:
    causal = result.kind == "causal-lm"
    head = ["scheme", "bits/weight", "size"]
    head += ["mean KL", "p99 KL", "top-1", "PPL"] if causal else ["1 - emb. cos", "hidden cos"]
    head += ["probe err (RMS)"]
    rows = [head]
    for p in sorted(result.points, key=lambda p: -(p.bits_per_weight or 0)):
        e = p.evaluation
        bits = f"{p.bits_per_weight:.2f}" if p.bits_per_weight else "-"
        row = [p.scheme, bits, f"{p.bytes_out / 2**20:.1f} MiB"]
        if causal:
            row += [f"{e.mean_kl:.3g}", f"{e.p99_kl:.3g}", f"{e.top1:.1%}", f"{e.ppl_quantized:.4g}"]
        else:
            row += [f"{p.quality:.3g}", f"{e.hidden_cosine:.5f}"]
        row.append(f"{p.probe_error_rms:.3g}" if p.probe_error_rms is not None else "-")
        rows.append(row)
    return rows


def sweep_markdown(result: SweepResult) -> str:
    rows = _table(result)
    first = result.points[0].evaluation
    lines = [
        f"# quantfleet sweep of `{result.model}`",
        "",
        f"{result.kind}; text: {result.text}, {result.tokens} tokens; {first.device}, {first.dtype}.",
    ]
    if result.kind == "causal-lm":
        ppl = first.ppl_original
        lines.append(f"Original perplexity on this text: {ppl:.4g}." if ppl is not None else "")
    lines += [
        "",
        "![bits per weight vs quality](sweep.png)",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += [
        "",
        "Bits per weight count the quantized Linear weights with their scales and zero points; "
        "embeddings, norms and the output head stay in their original precision.",
        "",
        "## How far to trust the per-layer probe error",
        "",
        "![probe error vs quality](correlation.png)",
        "",
        f"x: RMS over the quantized Linears of the data-free output error ||Wx - W'x|| / ||Wx|| on "
        f"fixed random probes (what every conversion records); y: {_quality_label(result.kind)} "
        f"measured on the model. {len(result.points)} point(s).",
        "",
    ]
    if result.log_correlation is not None or result.rank_correlation is not None:
        lines.append(
            f"Pearson r of the logs: {_opt(result.log_correlation)}; Spearman rank correlation: "
            f"{_opt(result.rank_correlation)}."
        )
    if result.fit_exponent is not None and result.fit_factor is not None:
        lines.append(
            f"Fit on this model: {_quality_label(result.kind)} ~ {result.fit_factor:.3g} x "
            f"(probe error)^{result.fit_exponent:.2f}. It ranks schemes on one model; the factor "
            "is model-specific, so on a model too big to evaluate use it to compare schemes and "
            "find outlier layers, not as an absolute KL."
        )
    lines.append("")
    return "\n".join(lines)


def _opt(value: float | None) -> str:
    return "n/a (too few points)" if value is None else f"{value:.3f}"


def _write(result: SweepResult, out: Path) -> None:
    label = _quality_label(result.kind)
    parts = Path(result.model.rstrip("/")).parts
    name = "/".join(parts[-2:]) if parts and parts[-1] == "model" else (parts[-1] if parts else result.model)
    table = _table(result)
    points = [(p.scheme, p.bits_per_weight or math.nan, p.quality) for p in result.points]
    sweep_png = scatter_chart(
        points, xlabel="bits per weight (quantized tensors)", ylabel=f"{label} (log)",
        title=f"{name}: bits per weight vs {label}", table=table,
    )
    probe_points = [(p.scheme, p.probe_error_rms or math.nan, p.quality) for p in result.points]
    correlation_png = scatter_chart(
        probe_points, xlabel="per-layer probe output error, RMS over Linears (log)",
        ylabel=f"{label} (log)", title=f"{name}: data-free probe error vs model-level {label}",
        log_x=True, fit=True,
    )
    (out / "sweep.png").write_bytes(sweep_png)
    (out / "correlation.png").write_bytes(correlation_png)
    (out / "sweep.md").write_text(sweep_markdown(result))
    (out / "sweep.json").write_text(result.model_dump_json(indent=2) + "\n")
