"""Metric and schedule functions against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from saesweep.config.schema import SchedulerConfig
from saesweep.evaluation.metrics import ReconstructionStats, ce_loss_score, explained_variance
from saesweep.training.optim import lr_factor


def test_explained_variance_hand_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); total var = 2 + 2 = 4
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # sq err = 1 + 1 = 2
    assert float(explained_variance(x, x_hat)) == pytest.approx(0.5)
    assert float(explained_variance(x, x)) == 1.0


def test_reconstruction_stats_accumulate_across_batches_like_one_batch():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]])  # mean (2,1); total var 2+2+0 = 4
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 1.0]])  # sq err 2
    acts = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    stats = ReconstructionStats(2, 3)
    stats.update(x[:1], x_hat[:1], acts[:1])
    stats.update(x[1:], x_hat[1:], acts[1:])
    r = stats.result()
    assert r["explained_variance"] == pytest.approx(1 - 2 / 4)
    assert r["mse"] == pytest.approx(2 / 6)
    assert r["l0"] == pytest.approx(3 / 3)
    assert r["dead_fraction"] == pytest.approx(1 / 3)
    assert r["dead_window_tokens"] == 3


def test_explained_variance_is_float64_for_large_offsets():
    # A large common offset: float32 sums would lose the small spread entirely.
    torch.manual_seed(0)
    x = 1e4 + torch.randn(4096, 8)
    x_hat = x + 0.1 * torch.randn(4096, 8)
    stats = ReconstructionStats(8, 1)
    stats.update(x, x_hat, torch.ones(4096, 1))
    assert stats.result()["explained_variance"] == pytest.approx(0.99, abs=2e-3)


def test_ce_loss_score():
    assert ce_loss_score(ce_clean=2.0, ce_sae=3.0, ce_ablation=6.0) == pytest.approx(0.75)


def test_lr_schedules():
    const = SchedulerConfig(name="constant", warmup_steps=4)
    assert [lr_factor(s, 10, const) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = SchedulerConfig(name="cosine", warmup_steps=0, final_lr_fraction=0.1)
    assert lr_factor(0, 11, cos) == pytest.approx(1.0)
    assert lr_factor(5, 11, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(10, 11, cos) == pytest.approx(0.1)
    decay = SchedulerConfig(name="warmup_decay", warmup_steps=2, decay_steps=4)
    got = [lr_factor(s, 10, decay) for s in range(10)]
    assert got == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
