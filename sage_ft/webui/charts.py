"""Plotly figures for the Train and Monitoring tabs (pure functions of recorded data).

Curves come from a run's ``metric_update`` events (``TaskDetail.metrics_history``), so a finished
run's charts are drawn from the same file as a live one. Several runs overlay in one figure.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

# The look of every chart. Set as plotly's default for the figures built with plotly objects (the
# token histogram): plotly applies its default template without validating it again, while
# ``update_layout(template=...)`` deep-copies and validates it for each figure.
TEMPLATE = "plotly_white"
pio.templates.default = TEMPLATE

Series = tuple[str, Sequence[dict[str, Any]]]  # (run label, metric_update events)
Figure = dict[str, Any]  # a plotly.js figure: {"data": [traces], "layout": {...}}
_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction (weight 0 = raw)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm if norm else v)
    return out


def _points(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float | None]]:
    """Steps and values of ``key``; a non-finite value (a NaN loss) becomes a gap (JSON has no NaN)."""
    xs: list[int] = []
    ys: list[float | None] = []
    for event in history:
        value = event.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and event.get("step") is not None:
            xs.append(int(event["step"]))
            ys.append(float(value) if math.isfinite(value) else None)
    return xs, ys


@functools.lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    return pio.templates[TEMPLATE].to_plotly_json()


# Points per curve sent to the browser. A long run keeps every point in its events file, but a page
# watching a 20,000-step run got 1.4 MB of chart data (and plotly re-drew 60,000 points) at every
# 2-second tick; past this many, each curve is thinned to the min and max of equal-width buckets, so
# spikes and gaps stay visible (dropping old points instead is a complaint about other studios).
MAX_POINTS = 2000


def thin(xs: Sequence[int], ys: Sequence[float | None],
         max_points: int = MAX_POINTS) -> tuple[list[int], list[float | None]]:
    """About ``max_points`` of the curve: ``max_points / 2`` equal buckets, each giving its lowest and
    highest point (in step order) and its first gap (a None, so a NaN stays a gap), plus both ends.
    Curves that fit are returned whole."""
    n = len(xs)
    if n <= max_points:
        return list(xs), list(ys)
    buckets = max(1, max_points // 2)
    keep: set[int] = {0, n - 1}
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        finite = [i for i in range(lo, hi) if ys[i] is not None]
        if len(finite) < hi - lo:
            keep.add(next(i for i in range(lo, hi) if ys[i] is None))
        if finite:
            keep.add(min(finite, key=lambda i: ys[i]))  # type: ignore[arg-type, return-value]
            keep.add(max(finite, key=lambda i: ys[i]))  # type: ignore[arg-type, return-value]
    order = sorted(keep)
    return [xs[i] for i in order], [ys[i] for i in order]


LEGEND_LINE_PX = 20


def _figure(traces: list[dict[str, Any]], title: str, y_title: str, log_y: bool, empty_text: str) -> Figure:
    """A plotly.js figure as plain data (what ``go.Figure.to_plotly_json()`` gives), built without
    plotly's per-property validation: these charts are rebuilt on every page tick of a live run, and
    validation cost 10x the rest (25 ms of CPU per tick for three charts, bench/monitoring.py)."""
    # the legend (one line per curve in these narrow charts) takes its height from the plot's: each curve
    # beyond two makes the figure a line taller, so that the plot of several overlaid runs keeps its size
    height = 300 + LEGEND_LINE_PX * max(0, sum(1 for t in traces if t.get("showlegend", True)) - 2)
    layout: dict[str, Any] = {
        "title": {"text": title, "x": 0.02}, "height": height, "margin": {"l": 50, "r": 10, "t": 40, "b": 40},
        "xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": y_title}},
        # at the foot of the figure, below the x axis's title (placed in plot coordinates it was drawn over
        # the title whenever the plot was short)
        "legend": {"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"}, "hovermode": "x unified",
        "template": _template()}
    if log_y:
        layout["yaxis"]["type"] = "log"
    if not traces:
        layout["annotations"] = [{"text": empty_text, "showarrow": False, "xref": "paper", "yref": "paper",
                                  "x": 0.5, "y": 0.5, "font": {"color": "#888"}}]
    return {"data": traces, "layout": layout}


def loss_figure(runs: Sequence[Series], *, log_y: bool = False, smoothing: float = 0.6,
                title: str = "Training loss", empty_text: str = "no data yet") -> Figure:
    """Raw loss (thin) and its smoothed curve (bold) for each run."""
    traces = []
    for i, (label, history) in enumerate(runs):
        xs, ys = _points(history, "loss")
        if not xs:
            continue
        color = _PALETTE[i % len(_PALETTE)]
        raw_x, raw_y = thin(xs, ys)
        traces.append({"type": "scatter", "x": raw_x, "y": raw_y, "name": f"{label} (raw)",
                       "mode": "lines+markers" if len(xs) < 30 else "lines", "line": {"color": color, "width": 1},
                       "opacity": 0.35, "marker": {"size": 4}})
        # smoothed over every point, then thinned: the curve does not depend on the thinning
        smooth_x, smooth_y = thin([x for x, y in zip(xs, ys, strict=True) if y is not None],
                                  smooth([y for y in ys if y is not None], smoothing))
        traces.append({"type": "scatter", "x": smooth_x, "y": smooth_y, "name": f"{label} (smoothed)",
                       "mode": "lines", "line": {"color": color, "width": 2.5}})
    return _figure(traces, title, "loss", log_y, empty_text)


def metric_figure(runs: Sequence[Series], key: str, *, title: str, log_y: bool = False,
                  empty_text: str = "no data yet") -> Figure:
    """One line per run for ``key`` (``eval_loss``, ``learning_rate``, ...)."""
    traces = []
    for i, (label, history) in enumerate(runs):
        xs, ys = thin(*_points(history, key))
        if xs:
            traces.append({"type": "scatter", "x": xs, "y": ys, "name": label,
                           "mode": "lines+markers" if len(xs) < 200 else "lines",
                           "line": {"color": _PALETTE[i % len(_PALETTE)], "width": 2}, "marker": {"size": 5}})
    return _figure(traces, title, key, log_y, empty_text)


def to_json(figure: Figure) -> str:
    """The figure as the JSON ``gr.Plot`` sends to plotly.js."""
    return json.dumps(figure, separators=(",", ":"))


def token_histogram(lengths: Sequence[int], cutoff_len: int, *, title: str = "Token lengths",
                    cutoff_text: str = "cutoff_len") -> go.Figure:
    """Histogram of sample lengths in tokens with the cutoff marked."""
    fig = go.Figure(go.Histogram(x=list(lengths), nbinsx=min(40, max(5, len(lengths) // 3)),
                                 marker={"color": "#2563eb"}))
    fig.add_vline(x=cutoff_len, line={"color": "#dc2626", "dash": "dash"},
                  annotation_text=f"{cutoff_text} {cutoff_len}", annotation_position="top right")
    fig.update_layout(title={"text": title, "x": 0.02}, height=260, margin={"l": 40, "r": 10, "t": 40, "b": 40},
                      xaxis_title="tokens", yaxis_title="samples", bargap=0.05)
    return fig
