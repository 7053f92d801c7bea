"""A run dir never lies: its `.hydra/` record is written by us, once the run dir has accepted
the config, and never over a record of other settings; a refused rerun changes no byte."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import TINY_RUN, run_cli

from saesweep.errors import UserError
from saesweep.sweep.members import load_member
from saesweep.sweep.report import SweepReportCallback
from saesweep.training.run_record import RunRecord, config_differences, schema_defaults, without_keys


def record(k: int = 32, log_every: int = 10, rows: int = 16, overrides: list[str] | None = None) -> RunRecord:
    config = {"sae": {"k": k, "architecture": "topk"}, "training": {"log_every": log_every}, "eval": {"rows": rows}}
    return RunRecord(config, {"hydra": {"job": {"name": "train"}}}, overrides or [f"sae.k={k}"])


def snapshot(run_dir) -> dict:
    """Every file under run_dir (hidden ones too), by relative path, with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_without_keys_drops_sections_and_leaves_and_copies():
    config = {"a": {"b": 1, "c": 2}, "d": 3, "e": {"f": {"g": 4}}}
    assert without_keys(config, {"a.b", "d", "e.f.g", "x.y"}) == {"a": {"c": 2}, "e": {"f": {}}}
    assert config == {"a": {"b": 1, "c": 2}, "d": 3, "e": {"f": {"g": 4}}}


def test_config_differences_names_the_dotted_keys():
    assert config_differences({"sae": {"k": 16}, "x": 1}, {"sae": {"k": 8}, "x": 1, "y": 2}) == [
        "sae.k (16 -> 8)",
        "y (None -> 2)",
    ]


def test_a_key_the_saved_config_lacks_is_no_difference_at_its_schema_default():
    current = {"sae": {"architecture": "topk", "k": 32, "aux_k": None}, "activations": {"seqpos_slice": [None]}}
    saved = {"sae": {"architecture": "topk", "k": 32}, "activations": {}}
    defaults = schema_defaults(current)
    assert defaults["sae"]["aux_k"] is None and defaults["activations"]["seqpos_slice"] == [None]
    assert config_differences(saved, current, defaults=defaults) == []
    current["sae"]["aux_k"] = 4
    current["activations"]["seqpos_slice"] = [1, None]
    assert config_differences(saved, current, defaults=defaults) == [
        "activations.seqpos_slice (None -> [1, None])",
        "sae.aux_k (None -> 4)",
    ]
    # A key the saved config has and the current one lacks (removed from the schema) still differs.
    assert config_differences({"sae": {"gone": 1}}, {"sae": {}}, defaults=defaults) == ["sae.gone (1 -> None)"]


def test_a_new_run_dir_gets_the_three_files_in_hydras_format(tmp_path):
    rec = record()
    assert rec.check(tmp_path, finished=False, resume="auto") is None
    rec.write(tmp_path, None, resuming=False)
    hydra = tmp_path / ".hydra"
    assert sorted(p.name for p in hydra.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert yaml.safe_load((hydra / "config.yaml").read_text()) == rec.config
    assert yaml.safe_load((hydra / "overrides.yaml").read_text()) == ["sae.k=32"]
    assert yaml.safe_load((hydra / "hydra.yaml").read_text()) == {"hydra": {"job": {"name": "train"}}}
    assert RunRecord.load(tmp_path).config == rec.config


def test_a_finished_run_refuses_other_settings_naming_the_keys(tmp_path):
    record().write(tmp_path, None, resuming=False)
    with pytest.raises(UserError, match=r"finished run of a different config: sae.k \(32 -> 16\)"):
        record(k=16).check(tmp_path, finished=True, resume="auto")
    # its eval.json was measured with its own eval settings
    with pytest.raises(UserError, match=r"eval.rows \(16 -> 8\)"):
        record(rows=8).check(tmp_path, finished=True, resume="auto")
    # logging cadence changes nothing a finished run holds
    assert record(log_every=5).check(tmp_path, finished=True, resume="auto").config == record().config


def test_an_interrupted_run_refuses_other_settings_unless_forced(tmp_path):
    record().write(tmp_path, None, resuming=False)
    with pytest.raises(UserError, match=r"holds a run of a different config: sae.k \(32 -> 16\).*resume=force"):
        record(k=16).check(tmp_path, finished=False, resume="auto")
    assert record(k=16).check(tmp_path, finished=False, resume="force") is not None
    assert record(rows=8, log_every=5).check(tmp_path, finished=False, resume="auto") is not None


def test_a_resumed_run_keeps_its_record_and_appends_what_changed(tmp_path):
    original = record()
    original.write(tmp_path, None, resuming=False)
    before = snapshot(tmp_path)
    original.write(tmp_path, RunRecord.load(tmp_path), resuming=True)  # nothing changed: nothing written
    assert snapshot(tmp_path) == before
    changed = record(log_every=5, overrides=["sae.k=32", "training.log_every=5"])
    changed.write(tmp_path, RunRecord.load(tmp_path), resuming=True)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != ".hydra/resumes.yaml"} == before
    [entry] = yaml.safe_load((tmp_path / ".hydra" / "resumes.yaml").read_text())
    assert entry["changed"] == ["training.log_every (10 -> 5)"]
    assert entry["overrides"] == ["sae.k=32", "training.log_every=5"]


def test_a_fresh_start_replaces_the_record(tmp_path):
    record().write(tmp_path, None, resuming=False)
    record(log_every=5).write(tmp_path, RunRecord.load(tmp_path), resuming=True)
    assert (tmp_path / ".hydra" / "resumes.yaml").exists()
    assert record(k=16).check(tmp_path, finished=True, resume="never") is not None  # never: no refusal
    record(k=16).write(tmp_path, RunRecord.load(tmp_path), resuming=False)
    assert RunRecord.load(tmp_path).config["sae"]["k"] == 16
    assert not (tmp_path / ".hydra" / "resumes.yaml").exists()


def test_an_unreadable_record_is_a_one_line_error(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("sae: [unclosed\n")
    with pytest.raises(UserError, match=r"config.yaml is unreadable"):
        RunRecord.load(tmp_path)


class _Failed:
    class status:  # noqa: N801 - what Hydra's JobReturn.status looks like
        name = "FAILED"

    _return_value = UserError("bad")


def _job_config(member_dir):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "hydra": {
                "mode": "MULTIRUN",
                "runtime": {"output_dir": str(member_dir)},
                "sweep": {"dir": str(member_dir.parent)},
                "overrides": {"task": ["sae.k=-1"]},
            }
        }
    )


def test_a_refused_sweep_member_writes_status_only_where_no_run_is(tmp_path):
    """The callback records why a member failed, with its overrides, in a new member dir,
    but a member dir that holds a run (here a finished one) is left as it was."""
    new, finished = tmp_path / "0", tmp_path / "1"
    new.mkdir()
    finished.mkdir()
    (finished / "eval.json").write_text(json.dumps({"l0": 3.0}))
    before = snapshot(finished)
    callback = SweepReportCallback()
    for member in (new, finished):
        callback.on_job_end(_job_config(member), job_return=_Failed())
    assert snapshot(finished) == before
    status = json.loads((new / "status.json").read_text())
    assert status["overrides"] == ["sae.k=-1"] and status["error"] == "UserError: bad"
    member = load_member(new)
    assert member.status == "failed" and member.overrides == {"sae.k": "-1"}


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def run(tiny_lm) -> list[str]:
    """The runs here train on the tiny model: refusing and recording are bookkeeping, not the model's."""
    return [*tiny_lm, *TINY_RUN, "sae.k=4", "training.checkpoint_every_tokens=2048"]


@pytest.fixture(scope="module")
def finished_and_interrupted(run, tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    finished = run_cli("saesweep.train", *run, f"hydra.run.dir={root / 'finished'}", cwd=root)
    assert finished.returncode == 0, finished.stderr[-3000:]
    crashed = run_cli(
        "saesweep.train", *run, f"hydra.run.dir={root / 'interrupted'}", cwd=root, env={"SAESWEEP_CRASH_AT_STEP": "5"}
    )
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert (root / "interrupted" / "checkpoint.pt").exists() and (root / "interrupted" / ".hydra").is_dir()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("which", ["finished", "interrupted"])
def test_a_refused_rerun_changes_no_byte_of_the_run_dir(run, finished_and_interrupted, which):
    """A bad value, other settings, a corrupt record: exit 2, one error line, and every file
    in the run dir (.hydra/ and the log included) byte-identical."""
    run_dir = finished_and_interrupted / which
    before = snapshot(run_dir)
    refusals = {
        "sae.k=-5": "config key 'sae.k'",
        "sae.k=16": "of a different config: sae.k (4 -> 16)",
        "training.seed=7": "training.seed (42 -> 7)",
        "model.hook_point=blocks.6.hook_resid_pots": "model.hook_point",
    }
    if which == "finished":
        refusals["eval.rows=8"] = "eval.rows (24 -> 8)"
    for extra, needle in refusals.items():
        proc = run_cli("saesweep.train", *run, extra, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-3000:]
        assert snapshot(run_dir) == before, extra


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_refused_and_kept(run, finished_and_interrupted, tmp_path):
    run_dir = tmp_path / "corrupt"
    shutil.copytree(finished_and_interrupted / "interrupted", run_dir)
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = snapshot(run_dir)
    proc = run_cli("saesweep.train", *run, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and "checkpoint.pt is unreadable" in proc.stderr, proc.stderr[-3000:]
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_resumed_run_keeps_its_record(run, finished_and_interrupted, tmp_path):
    """Resumed with a key allowed to change: the original record stays, the change is appended."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(finished_and_interrupted / "interrupted", run_dir)
    record_before = {k: v for k, v in snapshot(run_dir).items() if k.startswith(".hydra/")}
    proc = run_cli("saesweep.train", *run, "training.log_every=4", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "eval.json").exists()
    after = snapshot(run_dir)
    assert {k: after[k] for k in record_before} == record_before
    [entry] = yaml.safe_load(after[".hydra/resumes.yaml"])
    assert entry["changed"] == ["training.log_every (2 -> 4)"]
