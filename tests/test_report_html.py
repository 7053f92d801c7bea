"""report.html and run.html from tiny hand-made run dirs: the data they embed, the tables, the CLI, the callback."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from saesweep.report import main
from saesweep.sweep import curves
from saesweep.sweep.page import data_script, read_page_data
from saesweep.sweep.report import SweepReportCallback, write_report

REPO = Path(__file__).resolve().parent.parent


def metrics_lines(n: int, k: int, terms: tuple[str, ...] = ("mse", "auxk")) -> list[dict]:
    return [
        {
            "step": 2 * (i + 1),
            "tokens": 2048 * (i + 1),
            "lr": 0.004,
            "loss": 500.0 / (i + 1) + k,
            **{f"loss/{t}": 400.0 / (i + 1) + j for j, t in enumerate(terms)},
            "l0": float(k),
            "explained_variance": 0.1 * i,
            "dead_features": i,
            "tokens_per_second": 100.0 + i,
        }
        for i in range(n)
    ]


def make_run(
    d: Path,
    overrides: dict[str, object],
    metrics: list[dict] | None = None,
    eval_json: dict | None = None,
    log10_rate: list[float] | None = None,
    w_dec: torch.Tensor | None = None,
    extra_lines: str = "",
) -> Path:
    """A run dir as training leaves it (only the files the report reads)."""
    config = {
        "model": {"name": "SmolLM2-135M-Instruct.Q4_1", "hook_point": "blocks.6.hook_resid_post"},
        "sae": {"architecture": "batchtopk", "k": 16},
        "training": {"seed": 42, "total_tokens": 8192},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + extra_lines)
    if eval_json is not None:
        (d / "eval.json").write_text(json.dumps(eval_json))
    if log10_rate is not None or w_dec is not None:
        (d / "sae").mkdir()
    if log10_rate is not None:
        save_file({"sparsity": torch.tensor(log10_rate)}, str(d / "sae" / "sparsity.safetensors"))
    if w_dec is not None:
        save_file({"W_dec": w_dec.contiguous()}, str(d / "sae" / "sae_weights.safetensors"))
    return d


def eval_of(l0: float, ev: float, ce: float) -> dict:
    return {"l0": l0, "explained_variance": ev, "ce_loss_score": ce, "mse": 1.0, "dead_fraction": 0.1}


RATES_0 = [-10.0, -3.0, -2.5, -2.0, -1.0, -10.0]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """0 and 1 done (seeds 0 and 1), 2 done (k=32), 3 running (a checkpoint, no eval.json), 4 failed."""
    s = tmp_path / "multirun" / "2026-12-04" / "12-00-00"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    make_run(
        s / "0",
        {"training.seed": 0},
        metrics_lines(4, 16),
        eval_of(16.2, 0.6, 0.8),
        RATES_0,
        w,
    )
    make_run(s / "1", {"training.seed": 1}, metrics_lines(4, 16), eval_of(16.0, 0.55, 0.79), [-2.0] * 6, w.flip(0))
    make_run(
        s / "2",
        {"training.seed": 0, "sae.k": 32},
        metrics_lines(4, 32, ("mse",)),
        eval_of(32.0, 0.7, 0.9),
        [-1.5] * 6,
        torch.randn(6, 4, generator=g),
    )
    nan_line = dict(metrics_lines(3, 8)[2], loss=math.nan)  # a skipped step logs a NaN loss
    make_run(
        s / "3",
        {"training.seed": 0, "sae.k": 8},
        [*metrics_lines(2, 8), nan_line],
        extra_lines='{"step": 8, "tokens": 81',  # killed mid-write
    )
    (s / "3" / "checkpoint.pt").write_bytes(b"")
    make_run(s / "4", {"training.seed": 0, "sae.k": 64}, metrics_lines(1, 64))
    (s / "4" / "status.json").write_text('{"status": "failed", "error": "RuntimeError: diverged"}')
    (s / "0" / "features.html").write_text("<html></html>")
    return s


def test_curves_in_report_are_the_metrics(sweep):
    write_report(sweep)
    data = read_page_data((sweep / "report.html").read_text())
    assert data["kind"] == "sweep" and [m["name"] for m in data["members"]] == ["0", "1", "2", "3", "4"]
    curve_ids = [k for k in data["figures"] if k.startswith("curve:")]
    assert curve_ids == [
        f"curve:{q}" for q in ("loss", "loss/mse", "loss/auxk", "l0", "explained_variance", "dead_features", "lr")
    ]
    checked = 0
    for figure_id in curve_ids:
        quantity = figure_id.removeprefix("curve:")
        for trace in data["figures"][figure_id]["data"]:
            run = trace["meta"]["run"]
            lines = [json.loads(x) for x in (sweep / run / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]
            want = [(r["tokens"], r[quantity]) for r in lines if quantity in r and math.isfinite(r[quantity])]
            assert list(zip(trace["x"], trace["y"])) == want, (run, quantity)
            checked += 1
    assert checked == 5 * 7 - 1  # member 2 logs no auxk term
    # member 3's NaN loss is left out of the loss curve, not drawn as a gap or a zero
    (loss3,) = [t for t in data["figures"]["curve:loss"]["data"] if t["meta"]["run"] == "3"]
    assert loss3["x"] == [2048, 4096]


def test_report_is_self_contained(sweep):
    write_report(sweep)
    page = (sweep / "report.html").read_text()
    # nothing fetched from elsewhere: no script, style or image from a URL
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", page)
    assert page.count("plotly.js v") == 1  # inlined once
    assert not [p for p in sweep.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files


def test_members_table(sweep):
    write_report(sweep)
    page = (sweep / "report.html").read_text()
    table = page[page.index("<h2>Members</h2>") : page.index("<h2>Sparsity")]
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]
    assert len(rows) == 5
    assert 'class="status-done"' in rows[0] and 'class="status-failed"' in rows[4]
    assert "status.json: RuntimeError: diverged" in rows[4]
    assert "trained 6,144 of 8,192 tokens; checkpoint.pt to resume from; no eval.json" in rows[3]
    assert '<a href="0/features.html">features.html</a>' in rows[0]  # the browser exists
    assert f"python -m saesweep.features {sweep / '1'}" in rows[1]  # how to make one
    assert "saesweep.features" not in rows[3]  # no SAE yet: nothing to browse
    # the overrides that differ are columns, sortable by value
    assert '<table class="sortable">' in table and "<th>training.seed</th>" in table and "<th>sae.k</th>" in table
    assert '<td data-sort="32.0">32</td>' in rows[2]


def test_pareto_points_carry_their_overrides(sweep):
    write_report(sweep)
    figures = read_page_data((sweep / "report.html").read_text())["figures"]
    ev, ce = figures["pareto:0"], figures["pareto:1"]
    (points, front) = ev["data"]
    assert points["text"] == ["0", "1", "2"]  # done members only
    assert points["x"] == [16.2, 16.0, 32.0] and points["y"] == [0.6, 0.55, 0.7]
    assert points["hovertext"][2] == "2: training.seed=0, sae.k=32"
    assert front["name"] == "Pareto front" and list(zip(front["x"], front["y"])) == [
        (16.0, 0.55),
        (16.2, 0.6),
        (32.0, 0.7),
    ]
    assert ce["data"][0]["y"] == [0.8, 0.79, 0.9]


def test_density_histogram_counts_dead_apart(sweep):
    write_report(sweep)
    density = read_page_data((sweep / "report.html").read_text())["figures"]["density"]
    by_run = {t["meta"]["run"]: t for t in density["data"]}
    assert set(by_run) == {"0", "1", "2"}  # runs with sae/sparsity.safetensors
    zero = by_run["0"]
    assert zero["meta"] == {"run": "0", "dead": 2, "latents": 6} and "2 of 6 dead" in zero["name"]
    assert sum(zero["y"]) == 4  # the four that fired; the dead are not drawn at -10
    # bins span [-3, 0] (floor of the lowest rate of any run, and 0): 50 bins of 0.06, so
    # -3, -2.5, -2 and -1 fall in bins 0, 8 (0.5 / 0.06 = 8.3), 16 (16.7) and 33 (33.3)
    assert zero["x"][0] == pytest.approx(-3 + 0.03) and zero["x"][-1] == pytest.approx(-0.03)
    assert [i for i, count in enumerate(zero["y"]) if count] == [0, 8, 16, 33]
    assert by_run["1"]["y"][16] == 6 and by_run["1"]["meta"]["dead"] == 0


def test_stability_in_report(sweep):
    write_report(sweep)
    page = (sweep / "report.html").read_text()
    section = page[page.index("<h2>Feature stability</h2>") :]
    rows = re.findall(r"<tr>(.*?)</tr>", section)[1:]
    # 0-1 differ in seed (1's decoder is 0's rows reversed: all match), 0-2 in k
    assert len(rows) == 2
    assert ">training.seed<" in rows[0] and rows[0].count(">100.0 %<") == 2
    assert ">sae.k<" in rows[1]
    assert json.loads((sweep / "stability.json").read_text())["pairs"].keys() == {"0|1", "0|2"}


def test_run_page_and_cli_on_a_run_dir(tmp_path, capsys):
    run = make_run(
        tmp_path / "outputs" / "2026-12-04" / "12-00-00",
        {"sae.k": 16},
        metrics_lines(3, 16),
        {**eval_of(16.0, 0.6, 0.8), "ce_clean": 3.2, "activation_source": "live"},
        RATES_0,
    )
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "run.html")
    assert not (run / "report.md").exists()
    page = (run / "run.html").read_text()
    data = read_page_data(page)
    assert data["kind"] == "run"
    (loss,) = data["figures"]["curve:loss"]["data"]
    assert loss["y"] == [r["loss"] for r in metrics_lines(3, 16)]
    assert data["figures"]["density"]["data"][0]["type"] == "bar"
    assert "<td>ce_clean</td>" in page and "<td>activation_source</td>" in page
    assert f"python -m saesweep.features {run}" in page


def test_cli_sweep_prints_both_reports(sweep, capsys):
    assert main([str(sweep)]) == 0
    assert capsys.readouterr().out.split() == [str(sweep / "report.md"), str(sweep / "report.html")]


def test_callback_writes_run_html_for_a_single_run(tmp_path):
    """A real Hydra app, not a multirun: the callback writes run.html into the run dir."""
    (tmp_path / "app.py").write_text(
        textwrap.dedent("""
        import json, hydra

        @hydra.main(version_base="1.3", config_path=None, config_name=None)
        def main(cfg):
            out = __import__("pathlib").Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
            (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 10, "loss": 2.0}) + "\\n")

        main()
    """)
    )
    proc = subprocess.run(
        [
            sys.executable,
            "app.py",
            "+x=1",
            "hydra.run.dir=run",
            "+hydra.callbacks.report._target_=saesweep.sweep.report.SweepReportCallback",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = read_page_data((tmp_path / "run" / "run.html").read_text())
    assert data["figures"]["curve:loss"]["data"][0]["y"] == [2.0]


def test_callback_single_run_without_output_dir_only_warns(caplog):
    from omegaconf import OmegaConf

    SweepReportCallback().on_job_end(OmegaConf.create({"hydra": {"mode": "RUN"}}), job_return=None)
    assert "run.html not written" in caplog.text


def test_data_script_survives_html_and_nan():
    hostile = {"figures": {}, "label": "</script><script>alert(1)</script>", "x": [1.0, math.nan, math.inf]}
    page = f"<html><body>{data_script(hostile)}</body></html>"
    assert page.count("</script>") == 1
    assert read_page_data(page) == {"figures": {}, "label": hostile["label"], "x": [1.0, None, None]}


def test_series_keeps_every_nth_point_and_the_last():
    records = [{"tokens": i, "l0": float(i)} for i in range(4501)]
    x, y = curves.series(records, "l0", max_points=2000)
    assert curves.stride(4501, 2000) == 3
    assert x[:3] == [0, 3, 6] and x[-2:] == [4497, 4500] and y == x
    assert len(x) == 1501


def test_read_metrics_skips_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"tokens": 1, "l0": 2}\n[1, 2]\n{"l0": 3}\n{"tokens": 5, "l0": 4}\n{"tok')
    assert curves.read_metrics(path) == [{"tokens": 1, "l0": 2}, {"tokens": 5, "l0": 4}]
    assert curves.read_metrics(tmp_path / "missing.jsonl") == []
