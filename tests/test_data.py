"""Token rows: windowing options, local formats, pretokenized data, holdout, shuffling, epochs.

Windowing is checked on tiny hand-written documents with a one-token-per-character
tokenizer, against rows worked out by hand; the embedded corpus checks the holdout.
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
from conftest import REPO

from saesweep.config.schema import DatasetConfig, check_dataset
from saesweep.data.rows import METADATA_FILE, load_hf_dataset, load_token_rows, tokenizer_fingerprint
from saesweep.data.rows import iter_rows as _iter_rows
from saesweep.errors import UserError

DOCS = REPO / "docs" / "errors.md"
# sha256 of the embedded corpus's rows (SmolLM2 tokenizer, default dataset config), taken
# with the code before the windowing options existed: caches and results depend on them.
GOLDEN_ROWS_SHA256 = "fd7ff236453769f250b122ee08c497bb853ae5c5d8c81efa5185fc7f45fe4397"


class CharTokenizer:
    """One token per character (ids < 256); BOS = 1, EOS = 2, no SEP token."""

    bos_token_id = 1
    eos_token_id = 2
    sep_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def __len__(self):
        return 256

    def get_vocab(self):
        return {chr(i): i for i in range(256)}


a, b, c, d, e, f, g, h = (ord(ch) for ch in "abcdefgh")
BOS, EOS = 1, 2
TEXT = [{"text": "abcde"}, {"text": "fgh"}]


def rows(docs, **cfg) -> list[list[int]]:
    cfg.setdefault("source", "hf")
    cfg.setdefault("context_size", 4)
    return [r.tolist() for r in _iter_rows(docs, DatasetConfig(**cfg), CharTokenizer())]


# --------------------------------------------------------------------------- windowing


@pytest.mark.parametrize(
    "options, want",
    [
        # today's default, prepend_bos: BOS starts each row and separates documents
        ({}, [[BOS, a, b, c], [BOS, d, e, BOS], [BOS, f, g, h]]),
        # nothing added: plain concatenation
        ({"prepend_bos": False}, [[a, b, c, d], [e, f, g, h]]),
        # a set key overrides what prepend_bos implies, the other stays BOS
        ({"begin_batch_token": "eos"}, [[EOS, a, b, c], [EOS, d, e, BOS], [EOS, f, g, h]]),
        ({"sequence_separator_token": "eos"}, [[BOS, a, b, c], [BOS, d, e, EOS], [BOS, f, g, h]]),
        # begin_sequence: each document starts with it; no separator, no row start
        ({"prepend_bos": False, "begin_sequence_token": "eos"}, [[EOS, a, b, c], [d, e, EOS, f]]),
        # separator only between documents sharing a row
        ({"prepend_bos": False, "sequence_separator_token": "eos"}, [[a, b, c, d], [e, EOS, f, g]]),
        # begin_batch only, as a token id
        ({"prepend_bos": False, "begin_batch_token": 7}, [[7, a, b, c], [7, d, e, f]]),
        # all three: the document's own start token follows the row's; no separator before it
        # at a row start; the separator is skipped where the next token already is one
        ({"begin_sequence_token": "eos"}, [[BOS, EOS, a, b], [BOS, c, d, e], [BOS, EOS, f, g]]),
    ],
)
def test_window_options_on_hand_written_documents(options, want):
    assert rows(TEXT, **options) == want


@pytest.mark.parametrize(
    "options, want",
    [
        # BOS first (begin_batch stands in for begin_sequence, as in SAELens); "fgh" + BOS fits
        # exactly, "ab" + BOS is short and dropped, and "abcde" loses its tail
        ({}, [[BOS, a, b, c], [BOS, f, g, h]]),
        ({"begin_sequence_token": "eos"}, [[EOS, a, b, c], [EOS, f, g, h]]),
        # nothing to add: a document needs context_size tokens of its own
        ({"prepend_bos": False}, [[a, b, c, d]]),
    ],
)
def test_without_concatenation_each_document_gives_its_head_alone(options, want):
    docs = [*TEXT, {"text": "ab"}, {"text": ""}]
    assert rows(docs, disable_concat_sequences=True, **options) == want
    # A document that already starts with the token gets no second one.
    ids = [{"input_ids": [BOS, 5, 6, 7, 8]}, {"input_ids": [9, 10, 11, 12, 13]}]
    assert rows(ids, is_tokenized=True, disable_concat_sequences=True) == [[BOS, 5, 6, 7], [BOS, 9, 10, 11]]


def test_too_few_documents_long_enough_is_one_line_naming_the_option(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("ab", "abcdef", "cd")))
    cfg = DatasetConfig(source="hf", path=str(path), context_size=4, disable_concat_sequences=True)
    with pytest.raises(UserError, match=r"gives 1 rows of 4 tokens \(dataset.disable_concat_sequences=true"):
        load_token_rows(cfg, CharTokenizer(), None, 0)


def test_separator_may_fill_a_row_and_empty_documents_add_nothing():
    # "ab" + separator fills the row; "cdef" starts the next one (f does not fit: dropped)
    assert rows([{"text": "ab"}, {"text": ""}, {"text": "cdef"}]) == [[BOS, a, b, BOS], [BOS, c, d, e]]


def test_no_second_bos_where_a_document_already_starts_with_one():
    # SAELens's rule: neither begin_batch nor the separator is added before the same token
    docs = [{"input_ids": [BOS, 5, 6]}, {"input_ids": [BOS, 7, 8, 9, 10]}]
    assert rows(docs, is_tokenized=True) == [[BOS, 5, 6, BOS], [BOS, 7, 8, 9]]


def test_a_token_the_tokenizer_lacks_is_named():
    with pytest.raises(UserError, match=r"^config key 'dataset.sequence_separator_token': the tokenizer has no SEP"):
        rows(TEXT, sequence_separator_token="sep")
    with pytest.raises(UserError, match=r"^config key 'dataset.begin_batch_token': token id 300 is not in"):
        rows(TEXT, begin_batch_token=300)


@pytest.mark.parametrize("value", ["cls", -1, 1.5, True])
def test_bad_token_values_fail_before_anything_loads(value):
    with pytest.raises(UserError, match=r"^config key 'dataset.begin_sequence_token': .*valid: bos, eos, sep, null"):
        check_dataset(DatasetConfig(begin_sequence_token=value))


# --------------------------------------------------------------------------- pretokenized


def test_pretokenized_documents_are_windowed_like_text():
    # first row is not context_size long: these are documents
    docs = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}]
    assert rows(docs, context_size=3, is_tokenized=True, prepend_bos=False) == [[5, 6, 7], [8, 9, 10]]


def test_pretokenized_rows_of_context_size_are_used_as_they_are():
    docs = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10]}]
    assert rows(docs, context_size=3, is_tokenized=True) == [[5, 6, 7], [8, 9, 10]]
    with pytest.raises(UserError, match=r"^config key 'dataset.context_size': row 1 of .* has 2 tokens"):
        rows([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}], context_size=3, is_tokenized=True)


def test_token_ids_outside_the_vocab_are_a_vocab_mismatch():
    docs = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 300, 10]}]
    with pytest.raises(UserError, match=r"^config key 'dataset.path': row 1 of .* has token id 300, outside .* 256"):
        rows(docs, context_size=3, is_tokenized=True)


def saved(tmp_path, docs, meta=None, name="ds"):
    import datasets

    path = tmp_path / name
    datasets.Dataset.from_list(docs).save_to_disk(str(path))
    if meta is not None:
        (path / METADATA_FILE).write_text(json.dumps(meta))
    return path


def meta(context_size=3, tokenizer=CharTokenizer()):
    return {
        "context_size": context_size,
        "tokenizer": {"name": "chars", "vocab_size": 256, "vocab_sha256": tokenizer_fingerprint(tokenizer)},
    }


def load_saved(path, **cfg):
    cfg = DatasetConfig(source="hf", path=str(path), holdout_fraction=0.5, **cfg)
    return load_token_rows(cfg, CharTokenizer(), 4, 0)


def test_pretokenized_metadata_must_match_the_tokenizer_and_context_size(tmp_path):
    docs = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10]}]
    good = load_saved(saved(tmp_path, docs, meta()), context_size=3, is_tokenized=True)
    assert good._train.tolist() == [[5, 6, 7]] and good.eval_rows.tolist() == [[8, 9, 10]]

    class OtherTokenizer(CharTokenizer):
        def get_vocab(self):
            return {**super().get_vocab(), "é": 255}

    other = saved(tmp_path, docs, meta(tokenizer=OtherTokenizer()), "other")
    with pytest.raises(UserError, match=r"^config key 'dataset.path': .* was tokenized with 'chars'"):
        load_saved(other, context_size=3, is_tokenized=True)
    with pytest.raises(UserError, match=r"^config key 'dataset.context_size': .* holds rows of 3 tokens"):
        load_saved(saved(tmp_path, docs, meta(), "ctx"), context_size=4, is_tokenized=True)
    with pytest.raises(UserError, match=r"^config key 'dataset.is_tokenized': .* is pretokenized"):
        load_saved(saved(tmp_path, docs, meta(), "flag"), context_size=3)


# --------------------------------------------------------------------------- local formats


WANT = [[BOS, a, b, c], [BOS, d, e, BOS], [BOS, f, g, h]]  # TEXT's rows at context_size 4


def write_format(tmp_path, kind):
    """TEXT as a local file or folder of one kind; returns (dataset.path, extra config)."""
    import datasets

    if kind == "txt files":  # one document per text file, in name order
        folder = tmp_path / "texts"
        folder.mkdir()
        (folder / "1.txt").write_text("abcde")
        (folder / "2.txt").write_text("fgh")
        return folder, {}
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in TEXT))
        return path, {}
    if kind == "json":
        path = tmp_path / "docs.json"
        path.write_text(json.dumps(TEXT))
        return path, {}
    if kind == "parquet":
        path = tmp_path / "docs.parquet"
        datasets.Dataset.from_list(TEXT).to_parquet(str(path))
        return path, {}
    if kind == "parquet folder":
        folder = tmp_path / "pq"
        folder.mkdir()
        datasets.Dataset.from_list(TEXT).to_parquet(str(folder / "part-0.parquet"))
        return folder, {}
    if kind == "save_to_disk":
        return saved(tmp_path, TEXT), {}
    if kind == "save_to_disk dict":
        path = tmp_path / "dict"
        junk = datasets.Dataset.from_list([{"text": "zzzz"}])
        datasets.DatasetDict({"train": junk, "validation": datasets.Dataset.from_list(TEXT)}).save_to_disk(str(path))
        return path, {"split": "validation"}
    if kind == "builder + data_files":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in TEXT))
        return "json", {"data_files": str(path)}
    raise AssertionError(kind)


FORMATS = [
    "txt files",
    "jsonl",
    "json",
    "parquet",
    "parquet folder",
    "save_to_disk",
    "save_to_disk dict",
    "builder + data_files",
]


@pytest.mark.parametrize("streaming", [False, True], ids=["finite", "streamed"])
@pytest.mark.parametrize("kind", FORMATS)
def test_local_formats_give_the_same_rows(tmp_path, kind, streaming):
    path, extra = write_format(tmp_path, kind)
    cfg = DatasetConfig(source="hf", path=str(path), context_size=4, streaming=streaming, **extra)
    assert [r.tolist() for r in _iter_rows(load_hf_dataset(cfg), cfg, CharTokenizer())] == WANT


def test_a_missing_split_of_a_saved_dataset_dict_is_named(tmp_path):
    path, _ = write_format(tmp_path, "save_to_disk dict")
    with pytest.raises(
        UserError,
        match=r"^config key 'dataset.split': 'test' is not a split of .*; "
        r"valid: train, validation",
    ):
        load_hf_dataset(DatasetConfig(source="hf", path=str(path), split="test"))


# --------------------------------------------------------------------------- holdout, shuffle, epochs


def test_shakespeare_holds_out_the_last_rows(smollm2):
    cfg = DatasetConfig()
    data = load_token_rows(cfg, smollm2.tokenizer, eval_rows=16, seed=0)
    n_eval = len(data.eval_rows)
    n_train = len(data._train)
    assert n_eval == round((n_eval + n_train) * 0.05)
    assert torch.all(data.eval_rows[:, 0] == smollm2.tokenizer.bos_token_id)
    # Rows (and so activation caches) built before the windowing options are built the same
    import hashlib

    table = torch.cat([data._train, data.eval_rows])
    assert table.shape == (12321, 128)
    assert hashlib.sha256(table.numpy().tobytes()).hexdigest() == GOLDEN_ROWS_SHA256
    # no held-out row is ever trained on (rows are long enough to be unique)
    held = {tuple(r.tolist()) for r in data.eval_rows}
    it = data.train_iter()
    assert all(tuple(next(it).tolist()) not in held for _ in range(n_train))


def long_text(tmp_path, chars=40):
    """One document of `chars` letters: 13 rows of BOS + 3 letters at context_size 4."""
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "".join(chr(ord("a") + i % 26) for i in range(chars))}) + "\n")
    return path


def test_shuffle_is_a_seeded_permutation_per_epoch(tmp_path):
    cfg = DatasetConfig(source="hf", path=str(long_text(tmp_path)), context_size=4)
    data = load_token_rows(cfg, CharTokenizer(), 4, seed=0)
    train = [tuple(r.tolist()) for r in data._train]
    assert len(train) == 12 and len(data.eval_rows) == 1  # round(13 * 0.05) -> at least 1

    def epochs(seed, n=2, shuffle=True):
        other = DatasetConfig(**{**cfg.__dict__, "shuffle": shuffle})
        it = load_token_rows(other, CharTokenizer(), 4, seed).train_iter()
        return [[tuple(next(it).tolist()) for _ in range(12)] for _ in range(n)]

    first, second = epochs(0)
    assert sorted(first) == sorted(second) == sorted(train)  # each epoch: every training row once
    assert first != second and first != train  # reshuffled each epoch
    assert epochs(0) == [first, second] and epochs(1)[0] != first  # reproducible from the seed
    assert epochs(0, shuffle=False) == [train, train]
    # resuming at a position continues the same sequence
    it = data.train_iter(start=17)
    assert [tuple(next(it).tolist()) for _ in range(7)] == second[5:]


def test_one_warning_at_start_when_the_run_needs_several_epochs(tmp_path, caplog):
    cfg = DatasetConfig(source="hf", path=str(long_text(tmp_path)), context_size=4)
    with caplog.at_level(logging.WARNING, logger="saesweep.data.rows"):
        data = load_token_rows(cfg, CharTokenizer(), 4, 0, total_tokens=120)
        it = data.train_iter()
        for _ in range(30):  # into the third epoch: no more warnings
            next(it)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # 12 training rows x 4 tokens = 48; 120 / 48 = 2.5
    assert warnings == [f"dataset {cfg.path}: 48 training tokens; training.total_tokens=120 needs 2.5 epochs"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saesweep.data.rows"):
        load_token_rows(cfg, CharTokenizer(), 4, 0, total_tokens=48)
    assert not caplog.records


# --------------------------------------------------------------------------- docs/errors.md


def data_errors(tmp_path) -> list[tuple[str, str, str]]:
    """(mistake, arguments, error line) for the dataset mistakes that need no CLI run to show."""
    docs = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10]}]
    cases = [
        (
            "windowing token not bos/eos/sep/id",
            "dataset.begin_batch_token=cls",
            lambda: check_dataset(DatasetConfig(begin_batch_token="cls")),
        ),
        (
            "tokenizer lacks the named token",
            "dataset.sequence_separator_token=sep (SmolLM2 has no SEP)",
            lambda: rows(TEXT, sequence_separator_token="sep"),
        ),
        (
            "pretokenized ids outside the model's vocab",
            "dataset.is_tokenized=true dataset.path={dir}",
            lambda: rows([{"input_ids": [5, 6, 300]}], context_size=3, is_tokenized=True, path="{dir}"),
        ),
        (
            "pretokenized with another context size",
            "dataset.path={dir} dataset.context_size=4",
            lambda: load_saved(saved(tmp_path, docs, meta(), "ctx"), context_size=4, is_tokenized=True),
        ),
        (
            "pretokenized with another tokenizer",
            "dataset.path={dir}",
            lambda: load_saved(
                saved(
                    tmp_path, docs, {**meta(), "tokenizer": {**meta()["tokenizer"], "vocab_sha256": "0" * 64}}, "tok"
                ),
                context_size=3,
                is_tokenized=True,
            ),
        ),
        (
            "pretokenized dataset read as text",
            "dataset.path={dir} (dataset.is_tokenized=false)",
            lambda: load_saved(saved(tmp_path, docs, meta(), "flag"), context_size=3),
        ),
        (
            "split not in a saved DatasetDict",
            "dataset.path={dir} dataset.split=test",
            lambda: load_hf_dataset(
                DatasetConfig(source="hf", path=str(write_format(tmp_path, "save_to_disk dict")[0]), split="test")
            ),
        ),
    ]
    out = []
    for what, args, make in cases:
        with pytest.raises(UserError) as info:
            make()
        line = re.sub(re.escape(str(tmp_path)) + r"/\w+", "{dir}", f"error: {info.value}")
        out.append((what, args, line))
    return out


def test_docs_list_the_dataset_errors(tmp_path):
    """docs/errors.md's dataset section shows these messages as raised (SAESWEEP_WRITE_ERROR_DOCS=1 rewrites it)."""
    table = "".join(f"| {what} | `{args}` | `{line}` |\n" for what, args, line in data_errors(tmp_path))
    start, end = "<!-- data-table -->\n", "<!-- /data-table -->"
    text = DOCS.read_text()
    if os.environ.get("SAESWEEP_WRITE_ERROR_DOCS") == "1":
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + start + "| mistake | arguments | what you see |\n|---|---|---|\n" + table + end + tail
        DOCS.write_text(text)
    missing = [row for row in table.splitlines() if row not in text]
    assert not missing, (
        "docs/errors.md is out of date (SAESWEEP_WRITE_ERROR_DOCS=1 python -m pytest "
        "tests/test_data.py):\n" + "\n".join(missing)
    )
