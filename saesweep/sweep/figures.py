"""The plots of report.html and run.html, as plotly figures (plain dicts: data + layout).

Each is validated by plotly's Python classes when built (a misspelt property fails here,
not silently in the browser) and drawn in the page by the plotly.js that ships inside
the plotly wheel (saesweep.sweep.page inlines it). Every trace carries its own numbers,
so what a page draws is exactly what a test can read back out of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from saesweep.sweep import curves
from saesweep.sweep.members import pareto_front

# D3's category10: distinct on white, the palette people know from matplotlib and plotly.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "hexagon", "cross")
L0_TITLE = "L0 (mean active latents per token)"
PARETO_PANELS = (("explained_variance", "explained variance"), ("ce_loss_score", "CE loss score"))
DENSITY_BINS = 50
DEAD_LOG10 = -10.0  # SAELens's sparsity value for a latent that never fired


@dataclass
class Series:
    """One run as the plots see it."""

    name: str  # member name ("0") or the run dir's name
    label: str  # name plus the overrides that tell it apart
    color: str
    architecture: str
    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    log10_rate: list[float] | None = None  # sae/sparsity.safetensors


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def checked(figure: dict[str, Any]) -> dict[str, Any]:
    """The figure as plotly.js takes it, after plotly's own validation."""
    import plotly.graph_objects as go

    return go.Figure(figure).to_plotly_json()


def _layout(title: str, x_title: str, y_title: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "font": {"size": 14}},
        "xaxis": {"title": {"text": x_title}, "gridcolor": "#e5e5e5", "zeroline": False},
        "yaxis": {"title": {"text": y_title}, "gridcolor": "#e5e5e5", "zeroline": False},
        "plot_bgcolor": "white",
        "margin": {"l": 70, "r": 20, "t": 50, "b": 55},
        "hovermode": "closest",
        "legend": {"font": {"size": 11}},
        **extra,
    }


def wide_range(values: list[float]) -> bool:
    """L0 spans a decade or more (k = 8 ... 256): a log axis keeps the sparse end apart."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 10


def pareto_figures(series: list[Series]) -> list[dict[str, Any]]:
    """L0 against explained variance and against CE loss score: one figure each.

    Points are labelled by member number and, on hover, by the overrides; one trace per
    architecture; the Pareto front (fewer latents, better reconstruction) as a step line.
    """
    figures = []
    for key, label in PARETO_PANELS:
        plotted = [s for s in series if _finite(s.metrics.get("l0")) and _finite(s.metrics.get(key))]
        traces = []
        for n, arch in enumerate(sorted({s.architecture for s in plotted})):
            members = [s for s in plotted if s.architecture == arch]
            traces.append(
                {
                    "type": "scatter",
                    "mode": "markers+text",
                    "name": arch,
                    "x": [s.metrics["l0"] for s in members],
                    "y": [s.metrics[key] for s in members],
                    "text": [s.name for s in members],
                    "textposition": "top center",
                    "hovertext": [_escape(s.label) for s in members],
                    "hovertemplate": "%{hovertext}<br>L0 %{x:.2f}, " + label + " %{y:.4f}<extra></extra>",
                    # colour: the member (as in the table and the curves); symbol: the architecture
                    "marker": {
                        "size": 10,
                        "symbol": SYMBOLS[n % len(SYMBOLS)],
                        "color": [s.color for s in members],
                        "line": {"width": 1, "color": "#333"},
                    },
                }
            )
        points = [(s.metrics["l0"], s.metrics[key]) for s in plotted]
        front = pareto_front(points)
        if front:
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": "Pareto front",
                    "x": [points[i][0] for i in front],
                    "y": [points[i][1] for i in front],
                    "line": {"shape": "hv", "color": "black", "width": 1.2},
                    "marker": {"symbol": "circle-open", "size": 18, "color": "black"},
                    "hoverinfo": "skip",
                }
            )
        layout = _layout(f"{label} against L0 (up and left is better)", L0_TITLE, label)
        if wide_range([p[0] for p in points]):
            layout["xaxis"]["type"] = "log"
        if not plotted:
            layout["annotations"] = [_empty_note(f"no finished run has {label}")]
        figures.append(checked({"data": traces, "layout": layout}))
    return figures


def curve_figures(series: list[Series]) -> list[tuple[str, dict[str, Any]]]:
    """(quantity, figure) per logged quantity, one line per run, against tokens."""
    figures = []
    for quantity in curves.quantities([s.records for s in series]):
        traces = []
        for s in series:
            x, y = curves.series(s.records, quantity)
            if not x:
                continue
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers" if len(x) <= 40 else "lines",
                    "name": _escape(s.label),
                    "x": x,
                    "y": y,
                    "line": {"color": s.color, "width": 1.5},
                    "marker": {"size": 4},
                    "meta": {"run": s.name, "quantity": quantity},
                    "hovertemplate": f"{_escape(s.label)}<br>%{{x:,}} tokens: %{{y:.4g}}<extra></extra>",
                }
            )
        layout = _layout(curves.title(quantity), "tokens", quantity, showlegend=len(series) > 1)
        values = [v for t in traces for v in t["y"]]
        if values and min(values) == max(values):
            # A constant (lr, k's L0): plotly would centre it in +-1, which hides small values.
            pad = abs(values[0]) / 2 or 1
            layout["yaxis"]["range"] = [values[0] - pad, values[0] + pad]
        elif quantity.startswith("loss") and values and min(values) > 0:
            layout["yaxis"]["type"] = "log"  # losses fall by decades early on
        figures.append((quantity, checked({"data": traces, "layout": layout})))
    return figures


def density_figure(series: list[Series]) -> dict[str, Any]:
    """Histogram of log10 firing rates over the eval tokens, as SAELens logs it to W&B, but with
    the dead latents (never fired: -10) counted in the legend rather than drawn as a spike at
    -10 that would squeeze the rest. One bar chart for a run, step lines for several."""
    with_rates = [s for s in series if s.log10_rate]
    alive_all = [v for s in with_rates for v in s.log10_rate if v > DEAD_LOG10]
    lo = math.floor(min(alive_all)) if alive_all else -6.0
    hi = max(0.0, math.ceil(max(alive_all))) if alive_all else 0.0
    if hi <= lo:
        lo -= 1
    width = (hi - lo) / DENSITY_BINS
    centers = [lo + (i + 0.5) * width for i in range(DENSITY_BINS)]
    single = len(with_rates) == 1
    traces = []
    for s in with_rates:
        counts = [0] * DENSITY_BINS
        for v in s.log10_rate:
            if v > DEAD_LOG10:
                counts[min(int((v - lo) / width), DENSITY_BINS - 1)] += 1
        dead = sum(v <= DEAD_LOG10 for v in s.log10_rate)
        name = f"{_escape(s.label)}: {dead} of {len(s.log10_rate)} dead"
        trace: dict[str, Any] = {
            "name": name,
            "x": centers,
            "y": counts,
            "meta": {"run": s.name, "dead": dead, "latents": len(s.log10_rate)},
            "hovertemplate": f"{_escape(s.label)}<br>log10 rate %{{x:.2f}}: %{{y}} latents<extra></extra>",
        }
        if single:
            trace.update(type="bar", marker={"color": s.color}, width=width)
        else:
            trace.update(type="scatter", mode="lines", line={"shape": "hvh", "color": s.color, "width": 1.5})
        traces.append(trace)
    title = "feature density: log10 firing rate over the eval tokens (latents that fired)"
    if single:
        s = with_rates[0]
        title += f"<br>{traces[0]['meta']['dead']} of {len(s.log10_rate)} latents dead (never fired)"
    layout = _layout(title, "log10 firing rate (fraction of eval tokens a latent is active on)", "latents")
    layout["showlegend"] = not single
    if not with_rates:
        layout["annotations"] = [_empty_note("no run has sae/sparsity.safetensors yet")]
    return checked({"data": traces, "layout": layout})


def _empty_note(text: str) -> dict[str, Any]:
    return {
        "text": text,
        "showarrow": False,
        "xref": "paper",
        "yref": "paper",
        "x": 0.5,
        "y": 0.5,
        "font": {"size": 16, "color": "gray"},
    }


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _escape(text: str) -> str:
    """Plotly reads HTML tags in names and hover text, and %{...} in hover templates; a label is plain text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("%{", "%&#123;")
