"""features.html: one card per latent, a self-contained page with no plotting library.

A card shows the latent's top contexts (each token shaded by the latent's activation
on it, the peak token outlined, the value on hover), its activation histogram (inline
SVG bars), and the tokens its decoder direction promotes and suppresses through the
unembedding. An index table at the top lists every latent shown, sortable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from saesweep.latents.collect import LatentResult
from saesweep.sweep.page import cell, document, esc, table

HISTOGRAM_BINS = 30

CSS = """
section.latent { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
section.latent h3 { margin: 2px 0 6px; }
.cols { display: grid; grid-template-columns: minmax(0, 1fr) 340px; gap: 16px; }
.context { font: 12.5px/1.9 ui-monospace, SFMono-Regular, Menlo, monospace; white-space: pre-wrap;
           border-bottom: 1px dotted #eee; padding: 1px 0; }
.context .value { display: inline-block; width: 64px; color: #666; text-align: right; margin-right: 8px; }
.tok { border-radius: 2px; }
.tok.peak { outline: 2px solid #c62828; font-weight: 700; }
.logits td { padding: 1px 6px; font-size: 12px; } .logits code { white-space: pre; }
.lens { display: flex; gap: 8px; align-items: flex-start; }
svg.hist rect { fill: #4C72B0; } svg.hist text { font-size: 10px; fill: #555; }
"""


@dataclass
class LatentCard:
    """Everything one card shows; tokens already decoded to text."""

    result: LatentResult
    group: str
    contexts: list[list[tuple[str, float]]] = field(default_factory=list)  # per context: (token text, activation)
    peaks: list[int] = field(default_factory=list)  # per context: index of the peak token in its list
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)


def context_tokens(
    result: LatentResult, rows: torch.Tensor, decode: Callable[[int], str]
) -> tuple[list[list[tuple[str, float]]], list[int]]:
    """Each context's window as (token text, activation), clipped to its row, and the peak's index."""
    contexts, peaks = [], []
    positions = rows.shape[1]
    for c in result.contexts:
        shown = [(p, a) for p, a in zip(range(c.start, c.start + len(c.acts)), c.acts) if 0 <= p < positions]
        contexts.append([(decode(int(rows[c.row, p])), a) for p, a in shown])
        peaks.append([p for p, _ in shown].index(c.position))
    return contexts, peaks


def histogram(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> tuple[list[float], list[int]]:
    """(edges, counts) of the values over [min(0, lowest), highest] in equal bins."""
    if len(values) == 0:
        return [], []
    lo, hi = min(0.0, float(values.min())), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    counts = torch.histc(values.double(), bins=bins, min=lo, max=hi)
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    return edges, [int(c) for c in counts.tolist()]


def histogram_svg(edges: list[float], counts: list[int], width: int = 320, height: int = 110) -> str:
    if not counts:
        return '<p class="muted">no activations</p>'
    plot_h, top = height - 28, max(counts)
    bar_w = width / len(counts)
    bars = []
    for i, count in enumerate(counts):
        h = plot_h * count / top if top else 0
        tip = f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {count:,} tokens"
        bars.append(
            f'<rect x="{i * bar_w:.1f}" y="{plot_h - h + 12:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}"><title>{esc(tip)}</title></rect>'
        )
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f'<text x="0" y="9">{top:,} tokens</text>{"".join(bars)}'
        f'<text x="0" y="{height - 3}">{edges[0]:.3g}</text>'
        f'<text x="{width}" y="{height - 3}" text-anchor="end">{edges[-1]:.3g}</text>'
        f'<text x="{width / 2}" y="{height - 3}" text-anchor="middle">activation</text></svg>'
    )


def shown(token: str) -> str:
    """A token's text made visible: newlines and tabs as symbols, nothing invisible."""
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


def _token_html(text: str, act: float, top: float, peak: bool) -> str:
    alpha = max(0.0, min(1.0, act / top)) if top > 0 else 0.0
    style = f' style="background:rgba(255,140,0,{alpha:.2f})"' if alpha > 0 else ""
    cls = "tok peak" if peak else "tok"
    return f'<span class="{cls}"{style} title="{act:.4g}">{esc(shown(text))}</span>'


def _logit_table(title: str, pairs: list[tuple[str, float]]) -> str:
    rows = "".join(f"<tr><td><code>{esc(shown(t))}</code></td><td class='num'>{v:+.3f}</td></tr>" for t, v in pairs)
    return (
        f"<table class='logits'><thead><tr><th colspan='2'>{esc(title)}</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def card_html(card: LatentCard, tokens_scanned: int) -> str:
    r = card.result
    top = r.contexts[0].value if r.contexts else 0.0
    rate = r.fires / tokens_scanned if tokens_scanned else 0.0
    head = (
        f'<h3>Latent {r.index} <span class="muted">&middot; {esc(card.group)} &middot; fires on '
        f"{100 * rate:.3g} % of tokens ({r.fires:,} of {tokens_scanned:,}) &middot; max {top:.4g}</span></h3>"
    )
    lines = []
    for ctx, peak, context in zip(r.contexts, card.peaks, card.contexts):
        spans = "".join(_token_html(t, a, top, i == peak) for i, (t, a) in enumerate(context))
        lines.append(
            f'<div class="context" data-row="{ctx.row}" data-position="{ctx.position}">'
            f'<span class="value">{ctx.value:.3g}</span>{spans}</div>'
        )
    if not lines:
        lines.append('<p class="muted">It did not fire on the scanned rows.</p>')
    edges, counts = histogram(r.values)
    side = [
        "<div><b>activation histogram</b> (tokens it fired on)</div>",
        histogram_svg(edges, counts),
    ]
    if card.promoted:
        side.append(
            f'<div class="lens">{_logit_table("promoted", card.promoted)}'
            f"{_logit_table('suppressed', card.suppressed)}</div>"
        )
    return (
        f'<section class="latent" id="latent-{r.index}" data-latent="{r.index}" data-group="{esc(card.group)}">'
        f'{head}<div class="cols"><div class="contexts">{"".join(lines)}</div>'
        f'<div class="side">{"".join(side)}</div></div></section>'
    )


def index_table(cards: list[LatentCard], tokens_scanned: int) -> str:
    columns = [("latent", True), ("group", False), ("fires on", True), ("max", True), ("top promoted token", False)]
    rows = []
    for card in cards:
        r = card.result
        rate = r.fires / tokens_scanned if tokens_scanned else 0.0
        top = r.contexts[0].value if r.contexts else 0.0
        rows.append(
            [
                cell(f'<a href="#latent-{r.index}">{r.index}</a>', r.index, numeric=True),
                cell(esc(card.group)),
                cell(f"{100 * rate:.3g} %", rate, numeric=True),
                cell(f"{top:.4g}", top, numeric=True),
                cell(f"<code>{esc(shown(card.promoted[0][0]))}</code>" if card.promoted else ""),
            ]
        )
    return table(columns, rows, sortable=True)


def features_page(title: str, intro: list[str], cards: list[LatentCard], tokens_scanned: int) -> str:
    """The whole page; `intro` are paragraphs of already-escaped HTML."""
    body = [f"<style>{CSS}</style>", f"<h1>{esc(title)}</h1>", *(f"<p>{p}</p>" for p in intro)]
    body.append("<h2>Latents shown</h2>")
    body.append(index_table(cards, tokens_scanned))
    body.append("<h2>Latents</h2>")
    body.extend(card_html(card, tokens_scanned) for card in cards)
    data: dict[str, Any] = {
        "kind": "features",
        "tokens_scanned": tokens_scanned,
        "latents": [
            {"index": c.result.index, "group": c.group, "fires": c.result.fires, "contexts": len(c.result.contexts)}
            for c in cards
        ],
    }
    return document(title, "\n".join(body), extra=data)
