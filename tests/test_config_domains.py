"""Every number and path key has a domain declared beside its schema field; a value outside it
is one line naming the key, the domain and the value, before any model loads."""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path

import pytest
import torch
from conftest import composed

from saesweep.config.domain import DOMAIN, Folder, Items, Range
from saesweep.config.schema import (
    EvaluateConfig,
    PretokenizeConfig,
    TrainConfig,
    validate,
    validate_evaluate,
    validate_pretokenize,
)
from saesweep.errors import UserError
from saesweep.sae import ARCHITECTURES


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


# (overrides, the whole error line after "error: "); {file}: a regular file.
TRAIN_CASES = [
    (["eval.rows=-1"], "config key 'eval.rows': must be > 0 or null (all), got -1"),
    (["eval.rows=0"], "config key 'eval.rows': must be > 0 or null (all), got 0"),
    (["eval.ce_rows=-1"], "config key 'eval.ce_rows': must be >= 0, got -1"),
    (["eval.batch_rows=0"], "config key 'eval.batch_rows': must be > 0, got 0"),
    (["training.total_tokens=-8"], "config key 'training.total_tokens': must be > 0, got -8"),
    (["training.batch_size=0"], "config key 'training.batch_size': must be > 0, got 0"),
    (["training.log_every=0"], "config key 'training.log_every': must be > 0, got 0"),
    (["training.dead_after_tokens=0"], "config key 'training.dead_after_tokens': must be > 0, got 0"),
    (["training.checkpoint_every_tokens=-1"], "config key 'training.checkpoint_every_tokens': must be >= 0, got -1"),
    (["training.max_nonfinite_steps=0"], "config key 'training.max_nonfinite_steps': must be > 0, got 0"),
    (["training.seed=-1"], "config key 'training.seed': must be in [0, 4294967296), got -1"),
    (
        ["training.grad_clip_norm=0"],
        "config key 'training.grad_clip_norm': must be > 0 or null (no clipping), got 0.0",
    ),
    (
        ["buffer.size_tokens=0"],
        "config key 'buffer.size_tokens': must be > 0 or auto (from the training device's free memory), got 0",
    ),
    (["optimizer.lr=0"], "config key 'optimizer.lr': must be > 0, got 0.0"),
    (["optimizer.lr=-1e-3"], "config key 'optimizer.lr': must be > 0, got -0.001"),
    (["optimizer.lr=nan"], "config key 'optimizer.lr': must be > 0, got nan (not a finite number)"),
    (["optimizer.lr=inf"], "config key 'optimizer.lr': must be > 0, got inf (not a finite number)"),
    (["optimizer.eps=0"], "config key 'optimizer.eps': must be > 0, got 0.0"),
    (["optimizer.weight_decay=-0.1"], "config key 'optimizer.weight_decay': must be >= 0, got -0.1"),
    (
        ["optimizer.betas=[0.9,1.0]"],
        "config key 'optimizer.betas': must be 2 numbers, each in [0, 1), got [0.9, 1.0]",
    ),
    (["optimizer.betas=[0.9]"], "config key 'optimizer.betas': must be 2 numbers, each in [0, 1), got [0.9]"),
    (["scheduler.warmup_steps=-1"], "config key 'scheduler.warmup_steps': must be >= 0, got -1"),
    (
        ["scheduler=cosine", "scheduler.final_lr_fraction=1.5"],
        "config key 'scheduler.final_lr_fraction': must be in [0, 1], got 1.5",
    ),
    (["activations.batch_rows=0"], "config key 'activations.batch_rows': must be > 0, got 0"),
    (
        ["activations.cache_tokens=0"],
        "config key 'activations.cache_tokens': must be > 0 or null (training.total_tokens), got 0",
    ),
    (["activations.shard_mb=0"], "config key 'activations.shard_mb': must be > 0, got 0.0"),
    (["dataset.context_size=1"], "config key 'dataset.context_size': must be >= 2, got 1"),
    (["dataset.holdout_fraction=1"], "config key 'dataset.holdout_fraction': must be in [0, 1), got 1.0"),
    (["sae.k=-5"], "config key 'sae.k': must be > 0, got -5"),
    (
        ["sae.expansion_factor=0"],
        "config key 'sae.expansion_factor': must be > 0 or null (sae.d_sae sets the width), got 0",
    ),
    (
        ["sae.d_sae=-1"],
        "config key 'sae.d_sae': must be > 0 or null (expansion_factor x the input width), got -1",
    ),
    (["sae.aux_k=-1"], "config key 'sae.aux_k': must be >= 0 or null (half the reconstructed width), got -1"),
    (["sae.threshold_lr=1.5"], "config key 'sae.threshold_lr': must be in (0, 1], got 1.5"),
    (["architecture=standard", "sae.l1_coefficient=-1"], "config key 'sae.l1_coefficient': must be >= 0, got -1.0"),
    (["architecture=jumprelu", "sae.bandwidth=0"], "config key 'sae.bandwidth': must be > 0, got 0.0"),
    (
        ["architecture=matryoshka_batchtopk", "sae.matryoshka_widths=[0,64]"],
        "config key 'sae.matryoshka_widths': must be a non-empty list of numbers, each > 0, got [0, 64]",
    ),
    (
        ["cache_dir={file}/x"],
        "config key 'cache_dir': must be a directory (existing, or one that can be created) or null "
        "($SAESWEEP_CACHE_DIR, else ~/.cache/saesweep), got '{file}/x' ({file} is a file)",
    ),
    (
        ["activations.cache_dir={file}"],
        "config key 'activations.cache_dir': must be a directory (existing, or one that can be created) or null "
        "(<cache_dir>/activations), got '{file}' (not a directory)",
    ),
    (
        ["eval.rows=null", "dataset=openwebtext"],
        "config key 'eval.rows': must be > 0 when dataset.streaming=true "
        "(the stream's first eval.rows rows are held out), got null",
    ),
]


@pytest.mark.parametrize("overrides, line", TRAIN_CASES, ids=[" ".join(o) for o, _ in TRAIN_CASES])
def test_a_training_value_outside_its_domain_is_one_line(overrides, line, a_file):
    cfg = composed("train", [o.replace("{file}", str(a_file)) for o in overrides])
    with pytest.raises(UserError) as refused:
        validate(cfg)
    assert str(refused.value) == line.replace("{file}", str(a_file))


@pytest.mark.parametrize(
    "overrides",
    [
        ["eval.rows=null"],
        ["training.grad_clip_norm=null"],
        ["training.checkpoint_every_tokens=0"],
        ["eval.ce_rows=0"],
        ["buffer.size_tokens=auto"],
    ],
)
def test_the_spellings_with_a_meaning_are_accepted(overrides):
    validate(composed("train", overrides))


def test_evaluate_and_pretokenize_keys_have_domains(tmp_path, a_file):
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    cases = {
        (f"sae_path={sae_dir}", "eval.rows=-1"): "config key 'eval.rows': must be > 0 or null (all), got -1",
        (f"sae_path={sae_dir}", "seed=-3"): "config key 'seed': must be in [0, 4294967296), got -3",
        (f"sae_path={tmp_path / 'gone'}",): (
            f"config key 'sae_path': must be an existing directory, got '{tmp_path / 'gone'}' (does not exist)"
        ),
        (f"sae_path={sae_dir}", f"out_dir={a_file}/x"): (
            "config key 'out_dir': must be a directory (existing, or one that can be created) or null "
            f"(the Hydra run dir), got '{a_file}/x' ({a_file} is a file)"
        ),
    }
    for overrides, line in cases.items():
        with pytest.raises(UserError) as refused:
            validate_evaluate(composed("evaluate", list(overrides)))
        assert str(refused.value) == line
    cases = {
        (f"pretokenize.output_path={sae_dir}",): (
            "config key 'pretokenize.output_path': must be a path that does not exist yet, in a writable "
            f"directory or null (push to pretokenize.hf_repo_id only), got '{sae_dir}' (it exists)"
        ),
        (f"pretokenize.output_path={tmp_path / 'new'}", "pretokenize.max_rows=0"): (
            "config key 'pretokenize.max_rows': must be > 0 or null (all), got 0"
        ),
    }
    for overrides, line in cases.items():
        with pytest.raises(UserError) as refused:
            validate_pretokenize(composed("pretokenize", list(overrides)))
        assert str(refused.value) == line
    validate_pretokenize(composed("pretokenize", [f"pretokenize.output_path={tmp_path / 'new' / 'rows'}"]))


def test_the_cli_refuses_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import saesweep.lm.model
    import saesweep.train

    monkeypatch.setattr(saesweep.lm.model, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(sys, "argv", ["train", "eval.rows=-1", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as stop:
        saesweep.train.cli()
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.splitlines() == ["error: config key 'eval.rows': must be > 0 or null (all), got -1"]


def test_domains_describe_themselves_and_refuse_what_comparisons_would_let_through():
    assert Range(gt=0).describe() == "must be > 0"
    assert Range(ge=0, lt=1).describe() == "must be in [0, 1)"
    assert Range(le=2.5).describe() == "must be <= 2.5"
    assert Range(gt=0, null="off").describe() == "must be > 0 or null (off)"
    for value in (math.nan, True, "3"):  # NaN passes no comparison; a bool is not a count
        assert Range(ge=0).problem(value) is not None, value
    assert Range(ge=0).problem(0) is None and Range(ge=0).problem(0.5) is None
    assert Items(Range(gt=0), length=2).problem([1, None]) is not None


def test_folder_domains_read_the_disk_without_writing(tmp_path, a_file):
    before = sorted(tmp_path.rglob("*"))
    assert Folder().problem(tmp_path / "a" / "b") is None  # created when needed
    assert Folder().problem(a_file) == " (not a directory)"
    assert Folder().problem(a_file / "x" / "y") == f" ({a_file} is a file)"
    assert Folder(read=True).problem(tmp_path / "a") == " (does not exist)"
    assert Folder(new=True).problem(tmp_path) == " (it exists)"
    assert sorted(tmp_path.rglob("*")) == before


# --- every number and path field declares its domain, and every default is in it -------------

NUMBERS = {int, float}
PATH_FIELDS = {"cache_dir", "out_dir", "sae_path", "output_path"}
REQUIRED = {"sae_path"}  # no default: the command refuses to start without it


def schema_classes() -> list[type]:
    """Every dataclass of the three commands' schemas, each architecture's sae node included."""
    found: list[type] = []

    def walk(cls: type) -> None:
        if cls in found:
            return
        found.append(cls)
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if dataclasses.is_dataclass(default):
                    walk(type(default))

    for root in (TrainConfig, EvaluateConfig, PretokenizeConfig, *(a.config_class for a in ARCHITECTURES.values())):
        walk(root)
    return found


def numeric(hint: object) -> bool:
    args = typing.get_args(hint)
    return hint in NUMBERS or any(numeric(a) for a in args)


@pytest.mark.parametrize("cls", schema_classes(), ids=lambda c: c.__name__)
def test_every_number_and_path_field_declares_a_domain(cls):
    hints = typing.get_type_hints(cls)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if (numeric(hints[f.name]) or f.name in PATH_FIELDS) and DOMAIN not in f.metadata
    ]
    assert not missing, f"{cls.__name__}: no domain for {missing}"
    assert all(isinstance(f.metadata[DOMAIN], Folder) for f in dataclasses.fields(cls) if f.name in PATH_FIELDS)
    default = cls()
    for f in dataclasses.fields(cls):  # each default is in its own domain, or the key is required
        if DOMAIN in f.metadata and not (getattr(default, f.name) is None and f.name in REQUIRED):
            f.metadata[DOMAIN].check(f.name, getattr(default, f.name))


def test_eval_rows_null_evaluates_every_held_out_row():
    from saesweep.evaluation.held_out import evaluate
    from saesweep.sae import build_sae
    from saesweep.sae.standard import StandardSAEConfig

    class Source:  # each token's activation: its id in 4 dimensions
        def batches(self, rows, batch_rows):
            for i in range(0, len(rows), batch_rows):
                yield (rows[i : i + batch_rows].reshape(-1, 1).float().expand(-1, 4),)

    sae = build_sae(StandardSAEConfig(d_sae=8), d_in=4)
    rows = torch.arange(15).reshape(5, 3)
    every = evaluate(sae, Source(), rows, None, 0, 2)
    assert every["dead_window_tokens"] == 15
    assert evaluate(sae, Source(), rows, 2, 0, 2)["dead_window_tokens"] == 6
