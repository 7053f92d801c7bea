"""report.html for a sweep and run.html for one run: self-contained pages (saesweep.sweep.page).

report.html, in the sweep dir beside report.md:
- the members table, sortable by any column: status (done / failed / running / pending, and
  why), the overrides that differ, the eval metrics, and each member's feature browser
  (its features.html, or the command that writes it);
- L0 against explained variance and against CE loss score, points labelled by member
  number and, on hover, by their overrides; the Pareto front drawn;
- training curves from each member's metrics.jsonl against tokens: the loss and each
  loss term, L0, explained variance, dead latents, learning rate (one line per member);
- feature density: each member's histogram of log10 firing rates over the eval tokens
  (sae/sparsity.safetensors), dead latents counted;
- feature stability between members that differ only in training.seed or sae.k
  (saesweep.sweep.stability).
run.html, in a run dir: the same for one run (its eval metrics instead of the table
and the Pareto plots). Both are rewritten whole, atomically, each time.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from saesweep.atomic import atomic_write_text
from saesweep.sweep import figures, stability
from saesweep.sweep.curves import read_metrics
from saesweep.sweep.figures import Series
from saesweep.sweep.members import (
    METRIC_FORMAT,
    METRICS,
    MemberResult,
    differing_overrides,
    load_member,
    read_yaml,
    summary,
)
from saesweep.sweep.page import cell, document, esc, plot, table

REPORT_NAME = "report.html"
RUN_PAGE_NAME = "run.html"
FEATURES_NAME = "features.html"
METRIC_TITLES = {
    "l0": "L0",
    "explained_variance": "EV",
    "mse": "MSE",
    "dead_fraction": "dead",
    "ce_loss_score": "CE score",
    "tokens_trained": "tokens",
    "tokens_per_second": "tokens/s",
}


def read_log10_rate(run_dir: Path) -> list[float] | None:
    """sae/sparsity.safetensors (log10 firing rate per latent, -10 = never fired), or None."""
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / "sae" / "sparsity.safetensors"
    try:
        with safe_open(str(path), framework="numpy") as f:
            return [float(v) for v in f.get_tensor("sparsity").reshape(-1)]
    except (OSError, SafetensorError, KeyError):
        return None


def flat_config(run_dir: Path) -> dict[str, Any] | None:
    cfg = read_yaml(Path(run_dir) / ".hydra" / "config.yaml")
    return stability.flatten(cfg) if isinstance(cfg, dict) else None


def labels(members: list[MemberResult]) -> dict[str, str]:
    """Member name -> "name: key=value, ..." over the overrides that differ."""
    keys = differing_overrides([m.overrides for m in members])
    out = {}
    for m in members:
        parts = [f"{k}={(m.overrides or {}).get(k, '-')}" for k in keys] if m.overrides is not None else []
        out[m.name] = f"{m.name}: {', '.join(parts)}" if parts else m.name
    return out


def series_of(members: list[MemberResult], names: dict[str, str]) -> list[Series]:
    return [
        Series(
            name=m.name,
            label=names[m.name],
            color=figures.color(i),
            architecture=m.architecture or "unknown",
            metrics=dict(m.metrics),
            records=read_metrics(m.path / "metrics.jsonl"),
            log10_rate=read_log10_rate(m.path),
        )
        for i, m in enumerate(members)
    ]


def why(member: MemberResult, records: list[dict[str, Any]], config: dict[str, Any] | None) -> str:
    """The failure, or how far a running member got and what it has to resume from."""
    if member.status not in ("running", "pending") or not member.path.is_dir():
        return member.reason
    total = (config or {}).get("training.total_tokens")
    if records:
        done = int(records[-1]["tokens"])
        parts = [f"trained {done:,} of {total:,} tokens" if isinstance(total, int) else f"trained {done:,} tokens"]
    else:
        parts = ["no metrics logged yet"]
    if (member.path / "checkpoint.pt").exists():
        parts.append("checkpoint.pt to resume from")
    parts.append("no eval.json: running, queued or stopped")
    return "; ".join(parts)


def features_link(run_dir: Path, out_dir: Path) -> str:
    """A link to the run's feature browser, or the command that writes it (for a run with an SAE)."""
    page = Path(run_dir) / FEATURES_NAME
    if page.exists():
        return f'<a href="{esc(Path(os.path.relpath(page, out_dir)).as_posix())}">{FEATURES_NAME}</a>'
    if (Path(run_dir) / "sae").is_dir():
        return f"<code>python -m saesweep.features {esc(run_dir)}</code>"
    return ""


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and key in METRIC_FORMAT:
        return format(value, METRIC_FORMAT[key])
    if isinstance(value, float):
        return format(value, ".4g")
    return str(value)


def members_table(members: list[MemberResult], series: list[Series], configs: dict[str, Any], out_dir: Path) -> str:
    keys = differing_overrides([m.overrides for m in members])
    columns = [("member", True), ("status", False), ("why", False), ("architecture", False)]
    columns += [(k, False) for k in keys]
    columns += [(METRIC_TITLES[k], True) for k in METRICS] + [("feature browser", False)]
    rows = []
    for m, s in zip(members, series):
        row = [
            cell(f'<span class="swatch" style="background:{s.color}"></span>{esc(m.name)}', m.number, numeric=True),
            cell(esc(m.status), css=f"status-{m.status}"),
            cell(esc(why(m, s.records, configs.get(m.name)))),
            cell(esc(m.architecture or "")),
        ]
        for k in keys:
            value = (m.overrides or {}).get(k)
            row.append(cell(esc(value if value is not None else ""), _as_number(value)))
        for k in METRICS:
            value = m.metrics.get(k)
            row.append(cell(esc(_fmt(k, value)), value, numeric=True))
        row.append(cell(features_link(m.path, out_dir)))
        rows.append(row)
    return table(columns, rows, sortable=True)


def _as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def stability_section(pairs: list[stability.PairStability]) -> str:
    threshold = stability.MATCH_THRESHOLD
    intro = (
        f"<p>For two members that differ only in <code>training.seed</code> or in <code>sae.k</code>: "
        f"the fraction of one member's latents whose decoder direction (row of <code>W_dec</code>, "
        f"unit-normalised) has a cosine &ge; {threshold} with some latent of the other. Both directions "
        "are given, A in B and B in A: the best match is not symmetric. Every latent counts, dead ones "
        "included.</p>"
    )
    if not pairs:
        return intro + '<p class="muted">No two finished members differ in only one of those keys.</p>'
    columns = [
        ("A", True),
        ("B", True),
        ("differ in", False),
        ("A value", False),
        ("B value", False),
        ("latents A", True),
        ("latents B", True),
        (f"A in B (cos ≥ {threshold})", True),
        (f"B in A (cos ≥ {threshold})", True),
        ("mean best cos A→B", True),
        ("mean best cos B→A", True),
    ]
    rows = [
        [
            cell(esc(p.a), _as_number(p.a), numeric=True),
            cell(esc(p.b), _as_number(p.b), numeric=True),
            cell(esc(p.key)),
            cell(esc(p.value_a), _as_number(p.value_a)),
            cell(esc(p.value_b), _as_number(p.value_b)),
            cell(f"{p.d_sae_a:,}", p.d_sae_a, numeric=True),
            cell(f"{p.d_sae_b:,}", p.d_sae_b, numeric=True),
            cell(f"{100 * p.a_in_b:.1f} %", p.a_in_b, numeric=True),
            cell(f"{100 * p.b_in_a:.1f} %", p.b_in_a, numeric=True),
            cell(f"{p.mean_best_a:.3f}", p.mean_best_a, numeric=True),
            cell(f"{p.mean_best_b:.3f}", p.mean_best_b, numeric=True),
        ]
        for p in pairs
    ]
    return intro + table(columns, rows, sortable=True)


def _curves_and_density(series: list[Series], figs: dict[str, Any]) -> str:
    body = ["<h2>Training curves</h2>"]
    curve_figs = figures.curve_figures(series)
    if curve_figs:
        body.append(
            '<p class="muted">From each run\'s metrics.jsonl, against training tokens; measured on the '
            "training batch of the logging step. Click a legend entry to hide a run, double-click to show it "
            "alone.</p>"
        )
        body.append('<div class="grid">')
        for quantity, fig in curve_figs:
            figs[f"curve:{quantity}"] = fig
            body.append(plot(f"curve:{quantity}"))
        body.append("</div>")
    else:
        body.append('<p class="muted">No run has logged metrics yet.</p>')
    body.append("<h2>Feature density</h2>")
    figs["density"] = figures.density_figure(series)
    body.append(plot("density"))
    return "\n".join(body)


def _generated(command: str) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f'<p class="muted">Written {esc(now)}; rebuild it with <code>{esc(command)}</code>.</p>'


def sweep_page(sweep_dir: Path, members: list[MemberResult], out_dir: Path) -> str:
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    names = labels(members)
    series = series_of(members, names)
    configs = {m.name: flat_config(m.path) for m in members}
    weights = {
        m.name: m.path / "sae" / "sae_weights.safetensors"
        for m in members
        if m.status == "done" and configs[m.name] is not None
    }
    pairs = stability.sweep_stability({n: c for n, c in configs.items() if c is not None}, weights, out_dir)

    figs: dict[str, Any] = {}
    title = "/".join(sweep_dir.resolve().parts[-2:])
    body = [
        f"<h1>Sweep {esc(title)}</h1>",
        f"<p><code>{esc(sweep_dir)}</code> &middot; {esc(summary(members))}</p>",
        _generated(f"python -m saesweep.report {sweep_dir}"),
        "<h2>Members</h2>",
        '<p class="muted">Click a column header to sort. Metrics from each member\'s eval.json (held-out rows).</p>',
        members_table(members, series, configs, out_dir),
        "<h2>Sparsity against reconstruction</h2>",
        '<p class="muted">Finished members; labels are member numbers, hover for the overrides. '
        "The black step line is the Pareto front.</p>",
        '<div class="grid">',
    ]
    done = [s for m, s in zip(members, series) if m.status == "done"]
    for i, fig in enumerate(figures.pareto_figures(done)):
        figs[f"pareto:{i}"] = fig
        body.append(plot(f"pareto:{i}"))
    body.append("</div>")
    body.append(_curves_and_density(series, figs))
    body.append("<h2>Feature stability</h2>")
    body.append(stability_section(pairs))
    extra = {"kind": "sweep", "members": [_member_data(m, names[m.name]) for m in members]}
    return document(f"saesweep: sweep {title}", "\n".join(body), figs, extra)


def _member_data(m: MemberResult, label: str) -> dict[str, Any]:
    return {"name": m.name, "label": label, "status": m.status, "path": str(m.path), "metrics": m.metrics}


def run_page(run_dir: Path, out_dir: Path | None = None) -> str:
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    member = load_member(run_dir)
    label = ", ".join(f"{k}={v}" for k, v in (member.overrides or {}).items()) or run_dir.name
    (series,) = series_of([member], {member.name: run_dir.name})
    config = flat_config(run_dir) or {}
    eval_json = _read_json(run_dir / "eval.json")
    title = "/".join(run_dir.resolve().parts[-2:])
    body = [
        f"<h1>Run {esc(title)}</h1>",
        f'<p><code>{esc(run_dir)}</code> &middot; <span class="status-{member.status}">{esc(member.status)}</span>'
        + (f" &middot; {esc(why(member, series.records, config))}" if member.status != "done" else "")
        + "</p>",
        f"<p>{esc(member.architecture or 'unknown architecture')} SAE at "
        f"<code>{esc(config.get('model.hook_point', '?'))}</code> of <code>{esc(config.get('model.name', '?'))}</code>"
        f"; overrides: <code>{esc(label)}</code></p>",
        _generated(f"python -m saesweep.report {run_dir}"),
        f"<p>Feature browser: {features_link(run_dir, out_dir) or 'needs sae/ (written at the end of training)'}</p>",
        "<h2>Evaluation (eval.json, held-out rows)</h2>",
    ]
    if isinstance(eval_json, dict):
        scalars = [(k, v) for k, v in eval_json.items() if isinstance(v, (int, float, str, bool)) or v is None]
        rows = [
            [cell(esc(k)), cell(esc(_fmt(k, v)), v if isinstance(v, (int, float)) else None, numeric=True)]
            for k, v in scalars
        ]
        body.append(table([("metric", False), ("value", True)], rows))
    else:
        body.append('<p class="muted">No eval.json yet.</p>')
    figs: dict[str, Any] = {}
    body.append(_curves_and_density([series], figs))
    extra = {"kind": "run", "members": [_member_data(member, run_dir.name)]}
    return document(f"saesweep: run {title}", "\n".join(body), figs, extra)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_sweep_html(sweep_dir: Path, members: list[MemberResult], out_dir: Path) -> Path:
    path = Path(out_dir) / REPORT_NAME
    atomic_write_text(path, sweep_page(sweep_dir, members, out_dir))
    return path


def write_run_html(run_dir: Path, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_PAGE_NAME
    atomic_write_text(path, run_page(run_dir, out_dir))
    return path
