"""Compare the members of a Hydra multirun sweep (`python -m saesweep.report SWEEP_DIR`).

Writes report.csv, report.md (one row per member), pareto.png (L0 against explained
variance and against CE loss score, Pareto fronts drawn) and report.html (the same
and more, interactive: saesweep.sweep.report_html) into the sweep dir, or `--out DIR`.
`SweepReportCallback` does the same as the members of a sweep end, and writes run.html
into the run dir at the end of a single run. Members and their status:
saesweep.sweep.members.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from saesweep.atomic import atomic_write, atomic_write_text
from saesweep.sweep.members import (
    METRIC_FORMAT,
    METRICS,
    RUN_FILES,
    MemberResult,
    differing_overrides,
    load_sweep,
    pareto_front,
    summary,
)
from saesweep.sweep.report_html import write_run_html, write_sweep_html

log = logging.getLogger(__name__)

PANELS = (("explained_variance", "explained variance"), ("ce_loss_score", "CE loss score"))
L0_LABEL = "L0 (mean active latents per token)"
# Where a member-number label may sit around its point (points), first choice first.
LABEL_OFFSETS = ((8, 7), (8, -7), (-8, 7), (-8, -7), (0, 11), (0, -11), (14, 0), (-14, 0))


def report_rows(members: list[MemberResult]) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and one dict per member; metric values as floats, missing ones as None."""
    fixed = ["member", "status", "architecture"]
    keys = differing_overrides([m.overrides for m in members])
    # The `architecture` group override names the architecture column's value again,
    # unless a group option is named differently from the architecture it selects.
    if all((m.overrides or {}).get("architecture") in (None, m.architecture) for m in members):
        keys = [k for k in keys if k != "architecture"]
    # An override key can still clash with a fixed column or a metric.
    overrides = {k: f"{k} (override)" if k in fixed or k in METRICS else k for k in keys}
    columns = [*fixed, *overrides.values(), *METRICS, "reason"]
    rows = []
    for m in members:
        row = {"member": m.name, "status": m.status, "architecture": m.architecture, "reason": m.reason}
        row.update({col: (m.overrides or {}).get(key) for key, col in overrides.items()})
        row.update({k: m.metrics.get(k) for k in METRICS})
        rows.append(row)
    return columns, rows


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        # Counts such as tokens_trained come back from JSON as ints; keep them so.
        return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else str(v)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([cell(row[c]) for c in columns] for row in rows)
    return buf.getvalue()


def _md_text(sweep_dir: Path, members: list[MemberResult], columns: list[str], rows: list[dict[str, Any]]) -> str:
    def cell(column: str, v: Any) -> str:
        if v is None:
            return ""
        text = format(v, METRIC_FORMAT[column]) if column in METRIC_FORMAT else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        summary(members),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if c in METRICS else "---" for c in columns) + "|",
        *("| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows),
        "",
        "![L0 against explained variance and CE loss score](pareto.png)",
        "",
    ]
    return "\n".join(lines)


def _title(sweep_dir: Path) -> str:
    # Hydra's default sweep dir is multirun/DATE/TIME; the time alone says little.
    return "/".join(Path(sweep_dir).resolve().parts[-2:])


def _annotate(ax: Any, names: list[str], points: list[tuple[float, float]]) -> None:
    """Label points with their member numbers, each where it covers no point and no earlier label.

    Near-identical runs (the same k under topk and batchtopk) would otherwise print
    their numbers on top of each other.
    """
    ax.autoscale_view()
    px_per_pt = ax.figure.dpi / 72
    taken = [tuple(p) for p in ax.transData.transform(points)] if points else []
    for name, point, (x, y) in zip(names, points, list(taken)):

        def spot(offset: tuple[int, int]) -> tuple[float, float]:
            return x + offset[0] * px_per_pt, y + offset[1] * px_per_pt

        offset = next((o for o in LABEL_OFFSETS if all(math.dist(spot(o), t) > 12 for t in taken)), LABEL_OFFSETS[0])
        taken.append(spot(offset))
        ax.annotate(
            name, point, xytext=offset, textcoords="offset points", ha="center", va="center", fontsize=9, zorder=5
        )


def plot_pareto(members: list[MemberResult], path: Path, title: str) -> None:
    """Write the two-panel L0 vs metric plot of the done members to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    done = [m for m in members if m.status == "done" and math.isfinite(m.metrics.get("l0", math.nan))]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), layout="constrained")
    fig.suptitle(f"Sweep {title}: sparsity vs reconstruction", fontsize=13)
    architectures = sorted({m.architecture or "unknown" for m in done})
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(architectures)}
    l0s = [m.metrics["l0"] for m in done]
    # L0 sweeps usually span decades (k = 8 ... 256); a linear axis crowds the sparse end.
    log_x = bool(l0s) and min(l0s) > 0 and max(l0s) / min(l0s) >= 10

    for ax, (key, label) in zip(axes, PANELS):
        plotted = [m for m in done if math.isfinite(m.metrics.get(key, math.nan))]
        points = [(m.metrics["l0"], m.metrics[key]) for m in plotted]
        for arch in architectures:
            xy = [p for m, p in zip(plotted, points) if (m.architecture or "unknown") == arch]
            ax.scatter([x for x, _ in xy], [y for _, y in xy], color=colors[arch], s=45, zorder=3)
        front = pareto_front(points)
        if front:
            xs, ys = zip(*(points[i] for i in front))
            ax.step(xs, ys, where="post", color="black", lw=1.2, alpha=0.7, zorder=2)
            ax.scatter(xs, ys, s=150, facecolors="none", edgecolors="black", lw=1.3, zorder=4)
        if log_x:
            ax.set_xscale("log")
            # Label 10, 20, 50, 100, ... rather than only the powers of ten.
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        _annotate(ax, [m.name for m in plotted], points)
        ax.set_xlabel(L0_LABEL + (", log scale" if log_x else ""))
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs L0 (up and left is better)", fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        if not plotted:
            ax.set_xticks([])
            ax.set_yticks([])  # ticks around 0 would suggest data
            ax.text(
                0.5,
                0.5,
                f"no finished run has {label}" if done else "no finished runs",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=14,
                color="gray",
            )
    # One legend for both panels: the architectures and the front mean the same in each.
    handles = [Line2D([], [], ls="none", marker="o", color=colors[a], label=a) for a in architectures]
    handles.append(Line2D([], [], color="black", marker="o", mfc="none", ms=10, label="Pareto front"))
    if architectures:
        fig.legend(handles=handles, loc="outside right upper", title="architecture")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> Path:
    """Write report.csv, report.md, pareto.png and report.html for the sweep; returns report.md's path."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    members = load_sweep(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, rows = report_rows(members)
    atomic_write_text(out_dir / "report.csv", _csv_text(columns, rows))
    md_path = out_dir / "report.md"
    atomic_write_text(md_path, _md_text(sweep_dir, members, columns, rows))
    plot_pareto(members, out_dir / "pareto.png", _title(sweep_dir))
    write_sweep_html(sweep_dir, members, out_dir)
    return md_path


def _is_multirun(config: DictConfig) -> bool:
    mode = OmegaConf.select(config, "hydra.mode")
    return getattr(mode, "name", mode) == "MULTIRUN"


class SweepReportCallback(Callback):
    """Writes the sweep report when a multirun ends, and run.html when a single run ends;
    a report failure never fails the run or the sweep.

    Hydra's basic sweeper raises as soon as any member has failed and then never
    calls on_multirun_end, so the report is also refreshed after every member, and a
    failed member gets a status.json with its exception. A single run's page is written
    however the run ended (a diverged run's curves say why): one read of metrics.jsonl
    and the SAE's sparsity, after training and evaluation are over.
    """

    def _report(self, config: DictConfig) -> None:
        try:
            path = write_report(Path(config.hydra.sweep.dir))
            log.info("sweep report: %s", path)
        except Exception as e:
            log.warning("sweep report not written: %s: %s", type(e).__name__, e)
            log.debug("sweep report traceback", exc_info=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(config)

    def _run_page(self, config: DictConfig) -> None:
        try:
            path = write_run_html(Path(config.hydra.runtime.output_dir))
            log.info("run page: %s", path)
        except Exception as e:
            log.warning("run.html not written: %s: %s", type(e).__name__, e)
            log.debug("run.html traceback", exc_info=True)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from saesweep.training.distributed import launched_rank
        from saesweep.training.run_record import claimed_here

        if launched_rank() != 0:  # a data-parallel run's other ranks: rank 0 reports
            return
        if not _is_multirun(config):
            self._run_page(config)
            return
        member_dir = Path(config.hydra.runtime.output_dir)
        # A member refused by a dir that holds a run (finished, interrupted) leaves that dir
        # as it was: the refusal is the sweep's output, not the run's. A member that failed
        # after it claimed its dir (a diverged run) records why.
        ours = claimed_here(member_dir) or not any((member_dir / name).exists() for name in RUN_FILES)
        if getattr(getattr(job_return, "status", None), "name", None) == "FAILED" and ours:
            try:
                error = job_return._return_value  # the exception; .return_value would re-raise it
                status = {
                    "status": "failed",
                    "error": f"{type(error).__name__}: {error}",
                    # no .hydra/ record for a job refused before it started: keep its overrides here
                    "overrides": [str(o) for o in config.hydra.overrides.task],
                }
                atomic_write_text(member_dir / "status.json", json.dumps(status) + "\n")
            except Exception as e:
                log.warning("status.json not written: %s: %s", type(e).__name__, e)
        self._report(config)
