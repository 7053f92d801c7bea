"""Which positions of a token row give activations: BOS (activations.exclude_bos), every
special token (activations.exclude_special_tokens) and a slice of positions
(activations.seqpos_slice), SAELens's two options. Masks against hand-written references,
the activations they keep against the uncut pass, the cache's row count, the refusals, and
a run that trains with both and records them in its export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, run_in_process
from test_config import refusal

import saesweep.evaluate
import saesweep.train
from saesweep.activations.cache import tokens_per_row
from saesweep.activations.source import ActivationSource
from saesweep.config.schema import TrainConfig
from saesweep.data.rows import load_token_rows

HOOK = "blocks.1.hook_resid_post"


def mask(model, row: list[int], **kwargs) -> list[int]:
    source = ActivationSource(model, HOOK, None, **{"exclude_bos": False, **kwargs})
    return source.token_mask(torch.tensor([row]))[0].int().tolist()


def test_the_mask_drops_bos_special_tokens_and_positions_outside_the_slice(tiny_model):
    tok = tiny_model.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    other = (set(tok.all_special_ids) - {bos, eos}).pop()  # a third special token
    row = [bos, 10, 11, eos, 12, other, 13, bos]
    assert mask(tiny_model, row) == [1, 1, 1, 1, 1, 1, 1, 1]
    assert mask(tiny_model, row, exclude_bos=True) == [0, 1, 1, 1, 1, 1, 1, 0]
    assert mask(tiny_model, row, exclude_special_tokens=True) == [0, 1, 1, 0, 1, 0, 1, 0]
    assert mask(tiny_model, row, seqpos_slice=[2, None]) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert mask(tiny_model, row, seqpos_slice=[None, 5]) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert mask(tiny_model, row, seqpos_slice=[-3, None]) == [0, 0, 0, 0, 0, 1, 1, 1]
    assert mask(tiny_model, row, seqpos_slice=[-3]) == [1, 1, 1, 1, 1, 0, 0, 0]  # slice(-3): a stop, as in Python
    assert mask(tiny_model, row, seqpos_slice=[None, 6, 2], exclude_bos=True) == [0, 0, 1, 0, 1, 0, 0, 0]
    # A list of ids (an SAELens SAE may record one) drops those alone.
    assert mask(tiny_model, row, exclude_special_tokens=[eos]) == [1, 1, 1, 0, 1, 1, 1, 1]
    # One row alone (the live feed counts a row's tokens so) is masked as in a batch.
    source = ActivationSource(tiny_model, HOOK, None, True, True, [1, 7])
    assert source.token_mask(torch.tensor(row)).tolist() == source.token_mask(torch.tensor([row] * 3))[2].tolist()


def test_kept_positions_carry_the_uncut_passs_activations(tiny_model):
    rows = torch.randint(3, 1000, (3, 16))
    (full,) = ActivationSource(tiny_model, HOOK, None, False).hook_activations(rows)
    (kept,) = ActivationSource(tiny_model, HOOK, None, False, seqpos_slice=[4, 12, 3]).chunk(rows)
    torch.testing.assert_close(kept, full[:, 4:12:3].reshape(-1, full.shape[-1]))


@pytest.mark.parametrize(
    "seqpos_slice,expected",
    [
        ([None], 127),
        ([1, None], 127),
        ([None, 10], 9),
        ([5, None], 123),
        ([None, None, 2], 63),
        ([-4], 123),
        ([-4, None], 4),
    ],
)
def test_a_caches_rows_are_counted_with_the_positions_they_keep(seqpos_slice, expected):
    cfg = TrainConfig()  # context 128, BOS first in each row and excluded
    cfg.activations.seqpos_slice = seqpos_slice
    assert tokens_per_row(cfg, bos=1) == expected


@pytest.mark.parametrize(
    "override,words",
    [
        ("activations.seqpos_slice=[1,null,0]", "(the step)"),
        ("activations.seqpos_slice=[1,2,3,4]", "[start, stop, step]"),
        ("activations.seqpos_slice=[200,null]", "keeps no position of a row of dataset.context_size=128"),
        ("activations.seqpos_slice=[5,5]", "keeps no position"),
    ],
)
def test_a_slice_that_keeps_nothing_or_is_no_slice_is_refused_by_name(override, words):
    line = refusal([override])
    assert line.startswith("config key 'activations.seqpos_slice'") and words in line, line


def test_a_run_trains_on_the_kept_positions_and_records_them(tiny_lm, tiny_config, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    argv = [
        *tiny_lm,
        *TINY_RUN,
        "activations.exclude_special_tokens=true",
        "activations.seqpos_slice=[8,null]",
        f"hydra.run.dir={run_dir}",
    ]
    code, output = run_in_process(saesweep.train.cli, argv)
    assert code == 0, output[-3000:]
    metadata = json.loads((run_dir / "sae" / "cfg.json").read_text())["metadata"]
    assert metadata["seqpos_slice"] == [8, None] and metadata["exclude_special_tokens"] is True
    # Evaluated: the held-out rows' positions from 8 on that hold no special token.
    n = json.loads((run_dir / "eval.json").read_text())
    rows = load_token_rows(tiny_config.dataset, tiny_model.tokenizer, 24, tiny_config.training.seed).eval_rows[:24]
    kept = ~torch.isin(rows[:, 8:], torch.tensor(tiny_model.tokenizer.all_special_ids))
    assert "eval.rows=24" in TINY_RUN and n["dead_window_tokens"] == int(kept.sum()) < 24 * 56, n

    # saesweep.evaluate takes the positions the SAE records, unless told otherwise.
    for overrides, want in (([], int(kept.sum())), (["activations.seqpos_slice=[null]"], None)):
        out = tmp_path / f"eval{len(overrides)}"
        argv = [*tiny_lm, "eval.rows=24", "eval.ce_rows=4", "eval.batch_rows=8", f"sae_path={run_dir / 'sae'}"]
        code, output = run_in_process(saesweep.evaluate.cli, [*argv, *overrides, f"out_dir={out}"])
        assert code == 0, output[-3000:]
        got = json.loads((out / "eval.json").read_text())
        if want is not None:
            assert got["seqpos_slice"] == [8, None] and got["dead_window_tokens"] == want, got
            assert abs(got["explained_variance"] - n["explained_variance"]) < 1e-5, (got, n)
        else:
            every = ~torch.isin(rows, torch.tensor(tiny_model.tokenizer.all_special_ids))
            assert got["seqpos_slice"] == [None] and got["dead_window_tokens"] == int(every.sum()), got
