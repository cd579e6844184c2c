"""Plotly figures for the Train and Monitoring tabs (pure functions of recorded data).

Curves come from a run's ``metric_update`` events (``TaskDetail.metrics_history``), so a finished
run's charts are drawn from the same file as a live one. Several runs overlay in one figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

# The look of every chart. Set as plotly's default rather than per figure: plotly applies its default
# template without validating it again, while ``update_layout(template=...)`` deep-copies and
# validates the whole template for each figure, which was two thirds of a Monitor page tick's CPU
# during training (bench/monitoring.py). This process builds no other plotly figures.
pio.templates.default = "plotly_white"

Series = tuple[str, Sequence[dict[str, Any]]]  # (run label, metric_update events)
_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction (weight 0 = raw)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm if norm else v)
    return out


def _points(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for event in history:
        value = event.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and event.get("step") is not None:
            xs.append(int(event["step"]))
            ys.append(float(value))
    return xs, ys


def _layout(fig: go.Figure, title: str, y_title: str, log_y: bool, empty_text: str) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.02}, height=300, margin={"l": 50, "r": 10, "t": 40, "b": 40},
                      xaxis_title="step", yaxis_title=y_title, legend={"orientation": "h", "y": -0.25},
                      hovermode="x unified")
    if log_y:
        fig.update_yaxes(type="log")
    if not fig.data:
        fig.add_annotation(text=empty_text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font={"color": "#888"})
    return fig


def loss_figure(runs: Sequence[Series], *, log_y: bool = False, smoothing: float = 0.6,
                title: str = "Training loss", empty_text: str = "no data yet") -> go.Figure:
    """Raw loss (thin) and its smoothed curve (bold) for each run."""
    fig = go.Figure()
    for i, (label, history) in enumerate(runs):
        xs, ys = _points(history, "loss")
        if not xs:
            continue
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Scatter(x=xs, y=ys, name=f"{label} (raw)", mode="lines+markers" if len(xs) < 30 else "lines",
                                 line={"color": color, "width": 1}, opacity=0.35, marker={"size": 4}))
        fig.add_trace(go.Scatter(x=xs, y=smooth(ys, smoothing), name=f"{label} (smoothed)", mode="lines",
                                 line={"color": color, "width": 2.5}))
    return _layout(fig, title, "loss", log_y, empty_text)


def metric_figure(runs: Sequence[Series], key: str, *, title: str, log_y: bool = False,
                  empty_text: str = "no data yet") -> go.Figure:
    """One line per run for ``key`` (``eval_loss``, ``learning_rate``, ...)."""
    fig = go.Figure()
    for i, (label, history) in enumerate(runs):
        xs, ys = _points(history, key)
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, name=label, mode="lines+markers",
                                     line={"color": _PALETTE[i % len(_PALETTE)], "width": 2}, marker={"size": 5}))
    return _layout(fig, title, key, log_y, empty_text)


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
