"""Token rows from the embedded corpus: BOS-led rows, held-out tail, seeded shuffling."""

from __future__ import annotations

import torch

from saesweep.config import DatasetConfig
from saesweep.data import iter_rows, load_token_rows


class CharTokenizer:
    """One token per character; BOS = 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_rows_start_with_bos_and_bos_separates_documents():
    cfg = DatasetConfig(source="hf", context_size=4)
    rows = list(iter_rows([{"text": "abcde"}, {"text": "fgh"}], cfg, CharTokenizer()))
    a, b, c, d, e, f, g, h = (ord(ch) for ch in "abcdefgh")
    assert [r.tolist() for r in rows] == [[1, a, b, c], [1, d, e, 1], [1, f, g, h]]


def test_pretokenized_rows_without_bos():
    cfg = DatasetConfig(source="hf", context_size=3, is_tokenized=True, prepend_bos=False)
    rows = list(iter_rows([{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}], cfg, CharTokenizer()))
    assert [r.tolist() for r in rows] == [[5, 6, 7], [8, 9, 10]]


def test_shakespeare_holds_out_the_last_rows(smollm2):
    cfg = DatasetConfig()
    data = load_token_rows(cfg, smollm2.tokenizer, eval_rows=16, seed=0)
    n_eval = len(data.eval_rows)
    n_train = len(data._train)
    assert n_eval == round((n_eval + n_train) * 0.05)
    assert torch.all(data.eval_rows[:, 0] == smollm2.tokenizer.bos_token_id)
    # no held-out row is ever trained on (rows are long enough to be unique)
    held = {tuple(r.tolist()) for r in data.eval_rows}
    it = data.train_iter()
    assert all(tuple(next(it).tolist()) not in held for _ in range(n_train))
    # the order is shuffled, and reproducible from the seed
    first = [next(load_token_rows(cfg, smollm2.tokenizer, 16, seed=0).train_iter())[:8].tolist() for _ in range(2)]
    assert first[0] == first[1]
