"""The feature browser's parts on hand-made tensors: choosing latents, top contexts, logit effects, the page,
and the command's refusals."""

from __future__ import annotations

import html.parser
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saesweep.latents.collect import LatentCollector, choose_latents
from saesweep.latents.logit_lens import Unembedding, logit_effects, top_tokens
from saesweep.latents.page import LatentCard, card_html, context_tokens, features_page, histogram

REPO = Path(__file__).resolve().parent.parent


def test_choose_latents_groups():
    rate = torch.tensor([0.5, 0.0, 0.1, 0.01, 0.2, 0.01, 0.3, 0.0, 0.05, 0.02])
    groups = choose_latents(rate, n_sample=2, n_extreme=2, seed=0)
    assert groups["most frequent"] == [0, 6]
    assert groups["least frequent"] == [3, 5]  # equal rates: by index
    sample = groups["random sample"]
    assert len(sample) == 2 and sample == sorted(sample)
    assert set(sample) <= {2, 4, 8, 9}  # fired, and in no other group; 1 and 7 never fired
    assert choose_latents(rate, 2, 2, seed=0) == groups  # seeded
    draws = {tuple(choose_latents(rate, 2, 2, seed=s)["random sample"]) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_choose_latents_with_few_alive():
    rate = torch.tensor([0.0, 0.3, 0.0, 0.1])
    assert choose_latents(rate, n_sample=5, n_extreme=8, seed=0) == {
        "most frequent": [1, 3],
        "least frequent": [],
        "random sample": [],
    }
    assert choose_latents(torch.zeros(4), 5, 5, 0) == {"most frequent": [], "least frequent": [], "random sample": []}


def brute_force_top(acts: torch.Tensor, latent: int, n: int) -> list[tuple[float, int, int]]:
    """(value, row, position) of the n rows with the largest peak, by looping."""
    peaks = []
    for row in range(acts.shape[0]):
        values = acts[row, :, latent]
        position = int(values.argmax())
        peaks.append((float(values[position]), row, position))
    return sorted([p for p in peaks if p[0] > 0], key=lambda p: -p[0])[:n]


def test_collector_matches_brute_force_over_batches():
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(11, 7, 3, generator=g) - 0.5)  # sparse, non-negative
    acts[:, :, 2] = 0
    acts[4, 0, 2] = 5.0  # latent 2 fires once, at the first position of row 4
    collector = LatentCollector([10, 20, 30], n_contexts=4, before=2, after=1)
    for start in (0, 5, 9):  # batches of 5, 4 and 2 rows
        stop = {0: 5, 5: 9, 9: 11}[start]
        collector.update(acts[start:stop])
    results = collector.results()
    assert [r.index for r in results] == [10, 20, 30]
    for j, result in enumerate(results):
        want = brute_force_top(acts, j, 4)
        got = [(c.value, c.row, c.position) for c in result.contexts]
        assert got == [(pytest.approx(v), r, p) for v, r, p in want]
        nonzero = acts[:, :, j][acts[:, :, j] != 0]
        assert result.fires == len(nonzero) and torch.equal(result.values.sort().values, nonzero.sort().values)
        for c in result.contexts:  # the window: 2 before the peak, 1 after, 0 beyond the row
            expect = [float(acts[c.row, p, j]) if 0 <= p < 7 else 0.0 for p in range(c.position - 2, c.position + 2)]
            assert c.start == c.position - 2 and c.acts == pytest.approx(expect)
    (only,) = results[2].contexts
    assert (only.row, only.position, only.start, only.acts) == (4, 0, -2, [0.0, 0.0, 5.0, 0.0])


def test_context_tokens_clip_to_the_row_and_find_the_peak():
    rows = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    collector = LatentCollector([0], n_contexts=2, before=2, after=2)
    acts = torch.zeros(2, 4, 1)
    acts[1, 0, 0], acts[1, 1, 0] = 3.0, 1.0  # row 1 peaks at its first token
    acts[0, 3, 0] = 2.0  # row 0 at its last
    collector.update(acts)
    (result,) = collector.results()
    contexts, peaks = context_tokens(result, rows, lambda t: f"<{t}>")
    assert contexts == [[("<5>", 3.0), ("<6>", 1.0), ("<7>", 0.0)], [("<2>", 0.0), ("<3>", 0.0), ("<4>", 2.0)]]
    assert peaks == [0, 2]


def test_logit_effects_by_hand():
    W_U = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # d_model 2, vocab 3
    d = torch.tensor([[3.0, 1.0]])
    plain = Unembedding(W_U, None, False, "")
    assert logit_effects(d, plain).tolist() == [[3.0, 1.0, 5.0]]
    normed = Unembedding(W_U, torch.tensor([2.0, 0.5]), False, "")
    assert logit_effects(d, normed).tolist() == [[6.0, 0.5, 11.5]]  # (6, 0.5) @ W_U
    centred = Unembedding(W_U, torch.tensor([2.0, 0.5]), True, "")
    assert logit_effects(d, centred).tolist() == [[2.0, -0.5, 4.5]]  # d - mean = (1, -1); * w = (2, -0.5)
    top, bottom = top_tokens(logit_effects(d, centred), 2)
    assert top == [[(2, 4.5), (0, 2.0)]] and bottom == [[(1, -0.5), (0, 2.0)]]


def test_histogram():
    edges, counts = histogram(torch.tensor([0.5, 1.0, 1.5, 3.0]), bins=3)
    assert edges == [0.0, 1.0, 2.0, 3.0] and counts == [1, 2, 1]
    assert histogram(torch.zeros(0)) == ([], [])


class Cards(html.parser.HTMLParser):
    """Counts latent sections, their contexts and peak tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.latents: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "section" and "latent" in classes:
            self.latents.append({"index": int(a["data-latent"]), "group": a["data-group"], "contexts": 0, "peaks": 0})
        elif "context" in classes:
            self.latents[-1]["contexts"] += 1
        elif "peak" in classes:
            self.latents[-1]["peaks"] += 1


def test_card_and_page():
    rows = torch.tensor([[1, 2, 3]])
    collector = LatentCollector([7], n_contexts=3, before=1, after=1)
    collector.update(torch.tensor([[[0.0], [2.0], [1.0]]]))
    (result,) = collector.results()
    contexts, peaks = context_tokens(result, rows, {1: "a", 2: "<b>", 3: "\n"}.__getitem__)
    card = LatentCard(result, "random sample", contexts, peaks, promoted=[("x", 1.5)], suppressed=[("y", -2.0)])
    text = card_html(card, tokens_scanned=3)
    assert "&lt;b&gt;" in text and "<b>" not in text.replace("<b>activation", "")  # token text escaped
    assert "\u21b5" in text  # a newline token is shown as a symbol
    assert 'class="tok peak"' in text and "fires on 66.7 % of tokens (2 of 3)" in text
    page = features_page("t", ["intro"], [card], tokens_scanned=3)
    parser = Cards()
    parser.feed(page)
    assert parser.latents == [{"index": 7, "group": "random sample", "contexts": 1, "peaks": 1}]
    assert "<script src" not in page and "plotly" not in page.lower()


def run_features(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saesweep.features", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.write_text("x"), "is not a directory"),
        (lambda d: d.mkdir(), "has no .hydra/config.yaml"),
        (lambda d: ((d / ".hydra").mkdir(parents=True), (d / ".hydra" / "config.yaml").write_text("{}")), "no sae/"),
    ],
)
def test_bad_run_dir_is_one_line_and_writes_nothing(tmp_path, setup, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = run_features(str(run_dir), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bad_config_and_bad_options_are_one_line(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "sae").mkdir()
    (run_dir / "sae" / "cfg.json").write_text("{}")
    (run_dir / ".hydra" / "config.yaml").write_text("sae: {architecture: nope}\n")
    proc = run_features(str(run_dir), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "config.yaml: config key 'sae.architecture': unknown architecture 'nope'" in proc.stderr
    proc = run_features(str(run_dir), "--contexts", "0", cwd=tmp_path)
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: --contexts must be >= 1")
        and proc.stderr.count("\n") == 1
    )
    assert not (run_dir / "features.html").exists()
