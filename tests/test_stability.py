"""Feature stability: best decoder-cosine matches between two SAEs, on hand-made decoders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from saesweep.sweep import stability
from saesweep.sweep.stability import best_match_cosines, comparable_pairs, flatten, match_fractions, sweep_stability


def test_identical_decoders_match_completely():
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert match_fractions(w, w * 3.0) == pytest.approx((1.0, 1.0, 1.0, 1.0))


def test_hand_computed_fractions_differ_by_direction():
    # A: e1, e2, e3. B: e1, (0.8 e2 + 0.6 e3), 2 e3, -e1.
    a = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    b = torch.tensor([[1.0, 0, 0], [0, 0.8, 0.6], [0, 0, 2], [-1, 0, 0]])
    best_a, best_b = best_match_cosines(a, b)
    # e1 -> e1 (1); e2 -> the mixed row (0.8); e3 -> 2 e3 (1)
    assert best_a.tolist() == pytest.approx([1.0, 0.8, 1.0])
    # e1 (1); the mixed row -> e2 (0.8); 2 e3 (1); -e1: cosine -1 with e1, 0 with the others -> 0
    assert best_b.tolist() == pytest.approx([1.0, 0.8, 1.0, 0.0])
    a_in_b, b_in_a, mean_a, mean_b = match_fractions(a, b)
    assert (a_in_b, b_in_a) == pytest.approx((2 / 3, 2 / 4))
    assert (mean_a, mean_b) == pytest.approx((2.8 / 3, 2.8 / 4))


def test_threshold_is_inclusive_and_zero_rows_match_nothing():
    # cos = 9 / sqrt(81 + 19) = 0.9 exactly in float64
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[9.0, math.sqrt(19.0)]], dtype=torch.float64)
    best_a, best_b = best_match_cosines(a, b)
    assert best_a.tolist() == [0.9, 0.0] and best_b.tolist() == [0.9]
    assert match_fractions(a, b)[:2] == (0.5, 1.0)


def test_blocks_give_the_same_answer(monkeypatch):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(37, 8, generator=g), torch.randn(23, 8, generator=g)
    whole = best_match_cosines(a, b)
    monkeypatch.setattr(stability, "BLOCK_ELEMENTS", 23 * 5)  # blocks of 5 rows of a
    blocked = best_match_cosines(a, b)
    # (a matrix product of fewer rows may round differently in the last bit)
    assert torch.allclose(whole[0], blocked[0], atol=1e-6) and torch.allclose(whole[1], blocked[1], atol=1e-6)


def test_widths_must_agree():
    with pytest.raises(ValueError, match="different widths"):
        best_match_cosines(torch.ones(2, 3), torch.ones(2, 4))


def test_comparable_pairs():
    base = flatten({"sae": {"k": 16, "architecture": "topk"}, "training": {"seed": 0, "total_tokens": 100}})
    configs = {
        "0": base,
        "1": {**base, "training.seed": 1},  # seed only: a pair with 0
        "2": {**base, "sae.k": 32},  # k only: a pair with 0
        "3": {**base, "training.seed": 1, "sae.k": 32},  # seed and k: pairs with 1 (k) and 2 (seed)
        "4": {**base, "optimizer.lr": 0.1},  # another key: no pair
        "5": {**base, "logger.job_name": "x", "objectives": ["l0"]},  # naming only: same as 0, not a pair
    }
    assert comparable_pairs(configs) == [
        ("0", "1", "training.seed"),
        ("0", "2", "sae.k"),
        ("1", "3", "sae.k"),
        ("1", "5", "training.seed"),
        ("2", "3", "training.seed"),
        ("2", "5", "sae.k"),
    ]


def test_flatten():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None}) == {"a.b.c": 1, "a.d": [1, 2], "e": None}


def _weights(path, w_dec):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"W_dec": w_dec.contiguous()}, str(path))
    return path


def test_sweep_stability_caches_each_pair(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(10, 4, generator=g)
    weights = {
        "0": _weights(tmp_path / "0.safetensors", w),
        "1": _weights(tmp_path / "1.safetensors", torch.cat([w[:5], torch.randn(5, 4, generator=g)])),
    }
    configs = {"0": {"training.seed": 0}, "1": {"training.seed": 1}}
    (pair,) = sweep_stability(configs, weights, tmp_path)
    assert (pair.a, pair.b, pair.key, pair.value_a, pair.value_b) == ("0", "1", "training.seed", "0", "1")
    assert pair.a_in_b >= 0.5 and pair.b_in_a >= 0.5  # the five shared rows match exactly
    cached = json.loads((tmp_path / "stability.json").read_text())
    assert cached["threshold"] == 0.9 and cached["pairs"]["0|1"]["result"]["a_in_b"] == pair.a_in_b

    calls = []
    real = stability.match_fractions
    monkeypatch.setattr(stability, "match_fractions", lambda a, b: calls.append(1) or real(a, b))
    assert sweep_stability(configs, weights, tmp_path) == [pair]
    assert calls == []  # same files: read from stability.json
    _weights(weights["1"], w)  # new weights for member 1: computed again
    (again,) = sweep_stability(configs, weights, tmp_path)
    assert calls == [1] and again.a_in_b == 1.0


def test_unreadable_weights_leave_the_pair_out(tmp_path):
    weights = {"0": _weights(tmp_path / "0.safetensors", torch.eye(3)), "1": tmp_path / "1.safetensors"}
    weights["1"].write_text("not safetensors")
    assert sweep_stability({"0": {"sae.k": 1}, "1": {"sae.k": 2}}, weights, tmp_path) == []
