"""python -m saesweep.pretokenize: the saved rows are training's rows, written atomically,
with metadata training checks; training from them gives the same SAE as from the text."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF_DIR, TINY_RUN, run_cli, weights
from test_data import CharTokenizer

from saesweep import pretokenize as pt
from saesweep.config.schema import DatasetConfig
from saesweep.data.rows import METADATA_FILE, load_token_rows, tokenizer_fingerprint
from saesweep.errors import UserError


@pytest.fixture
def chars(monkeypatch):
    """Pretokenize with the one-token-per-character tokenizer instead of a model's."""
    monkeypatch.setattr(pt, "load_tokenizer", lambda model, cache_dir: CharTokenizer())


def config(tmp_path, **dataset) -> pt.PretokenizeConfig:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abcdefghij", "klmnop", "qrstuvwxyz"]))
    cfg = pt.PretokenizeConfig()
    cfg.dataset = DatasetConfig(source="hf", path=str(path), context_size=4, holdout_fraction=0.25, **dataset)
    cfg.pretokenize.output_path = str(tmp_path / "out")
    return cfg


def test_saved_rows_are_the_training_rows_with_metadata(tmp_path, chars):
    cfg = config(tmp_path, sequence_separator_token="eos")
    out = pt.pretokenize(cfg)
    raw = load_token_rows(cfg.dataset, CharTokenizer(), 4, seed=3)
    saved_cfg = DatasetConfig(source="hf", path=str(out), is_tokenized=True, context_size=4, holdout_fraction=0.25)
    saved = load_token_rows(saved_cfg, CharTokenizer(), 4, seed=3)
    # BOS + 3 tokens a row, EOS between documents: [1abc] [1def] [1ghi] [1j2k] [1lmn] [1op2]
    # [1qrs] [1tuv] | [1wxy] (z dropped): 9 rows, round(9 * 0.25) = 2 held out
    assert saved._train.shape == (7, 4) and torch.equal(saved._train, raw._train)
    assert torch.equal(saved.eval_rows, raw.eval_rows)
    assert saved._train[3].tolist() == [1, ord("j"), 2, ord("k")]
    assert saved._train[5].tolist() == [1, ord("o"), ord("p"), 2]
    assert saved.eval_rows[-1].tolist() == [1, ord("w"), ord("x"), ord("y")]
    it_raw, it_saved = raw.train_iter(), saved.train_iter()
    assert all(torch.equal(next(it_raw), next(it_saved)) for _ in range(14))  # same seeded order
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["context_size"] == 4 and meta["rows"] == 9 and meta["tokens"] == 36
    assert meta["tokenizer"]["vocab_sha256"] == tokenizer_fingerprint(CharTokenizer())
    assert meta["windowing"]["token_ids"] == {"begin_batch": 1, "begin_sequence": None, "separator": 2}
    assert meta["source"]["path"] == cfg.dataset.path and meta["saesweep_version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # no temp dir left


def test_max_rows_and_an_existing_output_and_a_crash(tmp_path, chars, monkeypatch):
    cfg = config(tmp_path)
    cfg.pretokenize.max_rows = 3
    out = pt.pretokenize(cfg)
    assert json.loads((out / METADATA_FILE).read_text())["rows"] == 3
    with pytest.raises(UserError, match=r"^config key 'pretokenize.output_path': .* exists"):
        pt.pretokenize(cfg)

    def crash(*args, **kwargs):
        yield torch.tensor([1, 2, 3, 4])
        raise RuntimeError("killed")

    monkeypatch.setattr("saesweep.data.rows.iter_rows", crash)
    cfg.pretokenize.output_path = str(tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="killed"):
        pt.pretokenize(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # nothing half-written


def compose_pretokenize(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="pretokenize", overrides=overrides)


@pytest.mark.parametrize("dataset", sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")))
def test_config_composes_with_the_training_groups(dataset):
    typed = pt.validate_pretokenize(
        compose_pretokenize([f"dataset={dataset}", "pretokenize.output_path=out", "dataset.begin_sequence_token=eos"])
    )
    assert typed.dataset.begin_sequence_token == "eos" and typed.pretokenize.output_path == "out"
    with pytest.raises(UserError, match=r"^config key 'pretokenize.output_path': missing"):
        pt.validate_pretokenize(compose_pretokenize([f"dataset={dataset}"]))
    with pytest.raises(UserError, match=r"^config key 'dataset.sequence_separator_token'"):
        pt.validate_pretokenize(
            compose_pretokenize(["pretokenize.output_path=out", "dataset.sequence_separator_token=x"])
        )


@pytest.mark.slow
def test_pretokenized_shakespeare_trains_to_the_same_sae_as_the_text(tmp_path, tiny_lm):
    """The CLI end to end: pretokenize (the embedded model's tokenizer), then the same run
    from the text and from the rows, on the tiny model (it shares that tokenizer)."""
    out = tmp_path / "shakespeare-64"
    proc = run_cli(
        "saesweep.pretokenize",
        f"pretokenize.output_path={out}",
        "dataset.context_size=64",  # the tiny model's context
        f"hydra.run.dir={tmp_path / 'pt'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = [o for o in tiny_lm if o.startswith("model")]
    runs = {}
    for name, dataset in (
        ("text", []),
        ("rows", ["dataset.source=hf", f"dataset.path={out}", "dataset.is_tokenized=true"]),
    ):
        runs[name] = tmp_path / name
        argv = [*model, *TINY_RUN, "dataset.context_size=64", *dataset, f"hydra.run.dir={runs[name]}"]
        proc = run_cli("saesweep.train", *argv, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def metrics(run_dir):
        result = json.loads((run_dir / "eval.json").read_text())
        return {k: v for k, v in result.items() if "second" not in k and k != "dataset_path"}

    text, rows = weights(runs["text"]), weights(runs["rows"])
    assert text.keys() == rows.keys() and all(torch.equal(text[k], rows[k]) for k in text)
    assert metrics(runs["text"]) == metrics(runs["rows"])
    assert metrics(runs["text"])["tokens_trained"] == 8192
