"""PNG charts for reports: per-layer error, bits per weight vs KL, and probe error vs KL.

matplotlib with the Agg backend, imported inside the functions (a CLI --help stays fast). The
PNG bytes depend only on the data (no timestamps), so re-runs publish identical files.
"""

from __future__ import annotations

import functools
import io
import math
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from workers.records import TensorRecord

__all__ = ["layer_of", "chart_kind", "chart_legend", "integer_layers", "per_layer_chart", "scatter_chart",
           "per_layer_series", "preload_pyplot"]

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.(.+)$")
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.\d+\.")


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, module within the layer) of a tensor name, or None outside numbered layers."""
    match = _LAYER.search(name.removesuffix(".weight"))
    return (int(match.group(1)), match.group(2)) if match else None


def chart_kind(module: str) -> str:
    """A module kind as charts show it: routed experts folded into one (`mlp.experts.*.up_proj`).

    An MoE layer holds 3 x 8-384 expert weights; a line or bar for each made a legend larger than
    the plot and hid everything else.
    """
    return _EXPERT_INDEX.sub(r"\1experts.*.", module)


def integer_layers(axes: Any) -> None:
    """Layer axes tick at whole layers only."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure_value(record: TensorRecord) -> float | None:
    return record.output_error if record.output_error is not None else record.relative_error


def per_layer_series(tensors: Sequence[TensorRecord]) -> dict[str, list[tuple[int, float]]]:
    """Module kind (`chart_kind`) -> [(layer, error)], error = probe output error (else relative
    weight error); for routed experts, the worst expert's in each layer."""
    worst: dict[str, dict[int, float]] = {}
    for record in tensors:
        where = layer_of(record.name)
        value = _figure_value(record)
        if where is None or value is None or record.scheme is None:
            continue
        layers = worst.setdefault(chart_kind(where[1]), {})
        layers[where[0]] = max(value, layers.get(where[0], value))
    return {kind: sorted(layers.items()) for kind, layers in sorted(worst.items())}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def preload_pyplot() -> None:
    """Import pyplot in a background thread, so the report's chart does not wait for it.

    The chart is drawn after the last unit, when nothing else runs: importing pyplot there took
    0.49 s of the chart's 0.81 s (a 4.4 GiB MoE conversion; the driver had imported torch and
    numpy already). Started while the units run, where the driver only waits on Ray. A failure
    here is ignored: the chart imports pyplot again and reports it there.
    """
    if "matplotlib.pyplot" not in sys.modules:
        threading.Thread(target=_quietly_import_pyplot, name="qf-pyplot", daemon=True).start()


def _quietly_import_pyplot() -> None:
    try:
        with _PYPLOT_LOCK:  # never beside a chart being drawn (pyplot's global state)
            _pyplot()
    except Exception:  # noqa: BLE001 - see preload_pyplot
        pass


# pyplot keeps global state and is not thread-safe; sync renders reports from several threads.
_PYPLOT_LOCK = threading.Lock()
_F = TypeVar("_F", bound=Callable[..., Any])


def _serialised(function: _F) -> _F:
    @functools.wraps(function)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _PYPLOT_LOCK:
            return function(*args, **kwargs)

    return locked  # type: ignore[return-value]


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    _pyplot().close(figure)
    return buffer.getvalue()


def chart_legend(kind: str) -> str:
    return f"{kind} (worst expert)" if "*" in kind else kind


@_serialised
def per_layer_chart(tensors: Sequence[TensorRecord], title: str) -> bytes | None:
    """Per-layer error of every quantized Linear, one line per module kind (routed experts: the
    worst expert of each layer); None if no layers."""
    series = per_layer_series(tensors)
    if not series:
        return None
    probed = any(t.output_error is not None for t in tensors)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 4.5))
    markers = "os^vD<>ph*x+"
    for i, (kind, points) in enumerate(series.items()):
        xs = [p[0] for p in points]
        ys = [max(p[1], 1e-12) for p in points]
        axes.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1, markersize=4,
                  label=chart_legend(kind))
    axes.set_yscale("log")
    integer_layers(axes)
    axes.set_xlabel("layer")
    axes.set_ylabel("output error ||Wx - W'x|| / ||Wx||" if probed else "relative weight error")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=2 if len(series) > 6 else 1, loc="best")
    figure.tight_layout()
    return _png(figure)


@_serialised
def scatter_chart(
    points: Sequence[tuple[str, float, float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
    table: Sequence[Sequence[str]] | None = None,
    fit: bool = False,
) -> bytes:
    """Labelled points (label, x, y), log y; optional table beside it and a log-log fit line."""
    plt = _pyplot()
    width = 13 if table else 7.5
    figure = plt.figure(figsize=(width, 4.8))
    axes = figure.add_axes((0.08, 0.12, 0.5 if table else 0.86, 0.78))
    shown = [(label, x, y) for label, x, y in points if math.isfinite(x) and math.isfinite(y) and y > 0]
    for label, x, y in shown:
        axes.scatter([x], [y], s=36, zorder=3)
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_yscale("log")
    if log_x:
        axes.set_xscale("log")
    if fit and len(shown) >= 2:
        lx = [math.log(x) for _, x, _ in shown if x > 0]
        ly = [math.log(y) for _, x, y in shown if x > 0]
        slope, intercept = _fit(lx, ly)
        if slope is not None:
            xs = [min(lx), max(lx)]
            axes.plot([math.exp(v) for v in xs], [math.exp(intercept + slope * v) for v in xs],
                      linestyle="--", linewidth=1, color="gray", label=f"fit: y ~ x^{slope:.2f}")
            axes.legend(fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    if table:
        side = figure.add_axes((0.62, 0.12, 0.36, 0.78))
        side.axis("off")
        cells = side.table(cellText=[list(r) for r in table[1:]], colLabels=list(table[0]), loc="center")
        cells.auto_set_font_size(False)
        cells.set_fontsize(7)
        cells.scale(1, 1.3)
    return _png(figure)


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float | None, float]:
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return None, mean_y
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, mean_y - slope * mean_x
