"""The HTML pages end to end: a 4-member sweep on the embedded default writes report.html, the
feature browser runs on a member, and every page renders in headless Chromium without errors."""

from __future__ import annotations

import html.parser
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, run_cli
from headless_chromium import browser_or_skip, open_page

from saesweep.sweep.page import read_page_data

pytestmark = pytest.mark.slow

# Every plot drawn by plotly (it adds js-plotly-plot to the div it draws into).
PLOTS_DRAWN = (
    "document.querySelectorAll('div.plot').length === document.querySelectorAll('div.plot.js-plotly-plot').length"
)


@pytest.fixture(scope="module")
def sweep(tiny_lm, tmp_path_factory) -> Path:
    """sae.k=8,16 x training.seed=0,1: pairs that differ only in k, and only in seed (on the
    tiny model: the pages read what the runs wrote, whatever the model)."""
    root = tmp_path_factory.mktemp("html-sweep")
    proc = run_cli(
        "saesweep.train",
        "--multirun",
        *tiny_lm,
        *TINY_RUN,
        "sae.k=8,16",
        "training.seed=0,1",
        f"hydra.sweep.dir={root / 'sweep'}",
        cwd=root,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "sweep"


@pytest.fixture(scope="module")
def features(sweep) -> Path:
    proc = run_cli("saesweep.features", str(sweep / "0"), cwd=sweep, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(sweep / "0" / "features.html")
    assert "held-out rows: 100%" in proc.stderr  # the progress bar
    return sweep / "0" / "features.html"


def test_the_sweep_writes_report_html_whose_curves_are_the_metrics(sweep):
    data = read_page_data((sweep / "report.html").read_text())
    assert [m["status"] for m in data["members"]] == ["done"] * 4
    traces = [t for k, f in data["figures"].items() if k.startswith("curve:") for t in f["data"]]
    compared = 0
    for trace in traces:
        run, quantity = trace["meta"]["run"], trace["meta"]["quantity"]
        records = [json.loads(line) for line in (sweep / run / "metrics.jsonl").read_text().splitlines()]
        assert trace["x"] == [r["tokens"] for r in records]
        assert trace["y"] == [r[quantity] for r in records]  # JSON round trip: the very floats
        compared += 1
    assert compared >= 4 * 6  # loss, loss terms, l0, EV, dead latents, lr for each member
    # seed pairs (0-1, 2-3) and k pairs (0-2, 1-3)
    pairs = json.loads((sweep / "stability.json").read_text())["pairs"]
    assert {k: v["key"] for k, v in pairs.items()} == {
        "0|1": "training.seed",
        "0|2": "sae.k",
        "1|3": "sae.k",
        "2|3": "training.seed",
    }
    for entry in pairs.values():
        assert all(0 <= entry["result"][k] <= 1 for k in ("a_in_b", "b_in_a"))


class Latents(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.latents: list[dict] = []
        self.tokens = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "section" and "latent" in classes:
            self.latents.append({"group": a["data-group"], "contexts": 0, "peaks": 0, "logits": 0})
        elif "context" in classes:
            self.latents[-1]["contexts"] += 1
        elif "peak" in classes:
            self.latents[-1]["peaks"] += 1
        elif "logits" in classes:
            self.latents[-1]["logits"] += 1


def test_features_html_shows_latents_with_top_contexts(features, sweep):
    parser = Latents()
    parser.feed(features.read_text())
    shown = [x for x in parser.latents if x["contexts"] > 0]
    assert len(shown) >= 20
    assert all(x["peaks"] == x["contexts"] for x in shown)  # one marked max-activating token per context
    assert all(x["logits"] == 2 for x in parser.latents)  # promoted and suppressed tokens
    assert {x["group"] for x in parser.latents} == {"most frequent", "least frequent", "random sample"}
    # The report now links to the browser.
    proc = run_cli("saesweep.report", str(sweep), cwd=sweep)
    assert proc.returncode == 0, proc.stderr
    assert '<a href="0/features.html">features.html</a>' in (sweep / "report.html").read_text()


def test_pages_render_in_chromium_without_errors(sweep, features, tmp_path):
    browser = browser_or_skip()
    proc = run_cli("saesweep.report", str(sweep / "1"), "--out", str(tmp_path / "run1"), cwd=sweep)
    assert proc.returncode == 0, proc.stderr
    pages = {
        "report": (sweep / "report.html", PLOTS_DRAWN),
        "run": (tmp_path / "run1" / "run.html", PLOTS_DRAWN),
        "features": (features, "document.querySelectorAll('section.latent').length > 0"),
    }
    for name, (page, ready) in pages.items():
        shot = tmp_path / f"{name}.png"
        report = open_page(
            browser, page, shot, ready=ready, probe="document.querySelectorAll('.js-plotly-plot').length"
        )
        assert report.errors == [], (name, report.errors)
        assert report.requests == [page.resolve().as_uri()], (name, report.requests)  # nothing else loaded
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if name != "features":
            assert report.value >= 4  # plots drawn
    size_mb = (sweep / "report.html").stat().st_size / 2**20
    print(f"report.html of the 4-member sweep: {size_mb:.2f} MiB")
    assert size_mb < 8


def test_logit_effects_agree_between_backends():
    """TransformerLens's W_U after ln_final.w and the HF output embedding after the final norm's
    weight are the same map for the embedded model."""
    from saesweep.config.schema import ModelConfig
    from saesweep.latents.logit_lens import logit_effects, unembedding
    from saesweep.lm.model import load_model

    tl = unembedding(load_model(ModelConfig(), torch.device("cpu"), None))
    hf = unembedding(load_model(ModelConfig(backend="hf", hook_point="model.layers.6"), torch.device("cpu"), None))
    assert tl.norm_weight is not None and hf.norm_weight is not None and not tl.centred and not hf.centred
    directions = torch.randn(5, tl.d_model, generator=torch.Generator().manual_seed(0))
    a, b = logit_effects(directions, tl), logit_effects(directions, hf)
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())
    assert not torch.allclose(a, directions @ tl.W_U)  # the norm's weight is applied


def test_screenshot_tool_is_not_fooled_by_a_broken_page(tmp_path):
    """The console check catches what it should: an exception and a failed load."""
    browser = browser_or_skip()
    page = tmp_path / "broken.html"
    page.write_text(
        '<html><body><script src="https://cdn.example.org/x.js"></script><script>nope()</script></body></html>'
    )
    report = open_page(browser, page, tmp_path / "broken.png")
    assert any("nope is not defined" in e for e in report.errors), report.errors
    assert any("cdn.example.org" in e for e in report.errors), report.errors
    assert "https://cdn.example.org/x.js" in report.requests


def test_features_on_other_rows_count_firings_first(sweep, features, tmp_path):
    """Fewer rows than evaluation's: the rates in sae/sparsity.safetensors are not these rows',
    so a first pass counts them. (Runs last: it rewrites member 1's page, not member 0's.)"""
    proc = run_cli("saesweep.features", str(sweep / "1"), "--rows", "8", "--sample", "4", "--extremes", "2", cwd=sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "counting firings: 100%" in proc.stderr
    page = (sweep / "1" / "features.html").read_text()
    assert "a first pass over the scanned rows" in page
    parser = Latents()
    parser.feed(page)
    assert len(parser.latents) == 8 and all(x["contexts"] > 0 for x in parser.latents)
