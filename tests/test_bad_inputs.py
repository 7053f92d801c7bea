"""Generated bad inputs (hypothesis): every one ends with exit code 2, one `error:` line and no
traceback, and leaves a finished and an interrupted run dir byte-identical.

The commands run in this process (their `cli()` with sys.argv set), so a case costs a config
composition, not a Python start: every generated case is refused before a model loads, and
the run dirs are trained on conftest's tiny model, so one that slipped through would cost
little. Each test draws its cases from one strategy and asserts how many distinct ones it
ran, so the count is checked, not assumed (together at least 220).
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from conftest import TINY_RUN, ctrl_c_after_step, run_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import saesweep.cache
import saesweep.evaluate
import saesweep.pretokenize
import saesweep.report
import saesweep.train


# Deterministic (CI reruns the same cases), no example database, no per-case deadline (a
# composition takes ~0.1 s but the first one imports torch-heavy modules).
def cases(n: int) -> settings:
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# --- the two run dirs every case is aimed at --------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_lm) -> list[str]:
    """The two runs' overrides: every case below aims at them, with their model and data."""
    return [*tiny_lm, *TINY_RUN, "training.total_tokens=6144", "training.checkpoint_every_tokens=2048"]


@pytest.fixture(scope="module")
def run_dirs(run, tmp_path_factory) -> dict[str, Path]:
    """A finished run, and one interrupted (SIGINT, as Ctrl-C) after its third step with a
    checkpoint; trained here, in this process, on the tiny model."""
    root = tmp_path_factory.mktemp("bad_inputs")
    finished, interrupted = root / "finished", root / "interrupted"
    code, out = run_in_process(saesweep.train.cli, [*run, f"hydra.run.dir={finished}"])
    assert code == 0 and (finished / "eval.json").exists(), out[-3000:]

    with ctrl_c_after_step(3):  # the loop checkpoints, then ends with exit 130
        code, out = run_in_process(saesweep.train.cli, [*run, f"hydra.run.dir={interrupted}"])
    assert code == 130 and (interrupted / "checkpoint.pt").exists(), out[-3000:]
    assert not (interrupted / "eval.json").exists()
    return {"finished": finished, "interrupted": interrupted}


def assert_refused(code: int, out: str, dirs: dict[str, Path], before: dict[str, dict[str, bytes]], case) -> None:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2, (case, out[-2000:])
    assert len(errors) == 1, (case, out[-2000:])
    assert "Traceback" not in out, (case, out[-2000:])
    for name, run_dir in dirs.items():
        assert snapshot(run_dir) == before[name], (case, name)


# --- what a bad value looks like --------------------------------------------------------------

WORDS = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10)
NOT_A_NUMBER = WORDS.filter(lambda w: w not in ("nan", "inf", "null", "true", "false"))
NON_POSITIVE = st.integers(max_value=0)
NEGATIVE = st.integers(max_value=-1)

# Keys whose domain is a positive integer, and keys where 0 means something (off, none).
POSITIVE_INTS = [
    "training.total_tokens",
    "training.batch_size",
    "training.log_every",
    "training.max_nonfinite_steps",
    "training.dead_after_tokens",
    "buffer.size_tokens",
    "activations.batch_rows",
    "eval.rows",
    "eval.batch_rows",
    "sae.k",
    "sae.expansion_factor",
]
NON_NEGATIVE_INTS = ["training.checkpoint_every_tokens", "eval.ce_rows"]
POSITIVE_FLOATS = ["optimizer.lr", "training.grad_clip_norm", "activations.shard_mb"]
# Closed choices, with one valid value each that the strategy must not draw.
CHOICES = {
    "training.device": ("auto", "cpu"),
    "training.resume": ("auto", "never", "force"),
    "training.autocast": ("none", "bf16"),
    "training.distributed": ("none", "ddp"),
    "activations.source": ("live", "cache", "auto"),
    "model.source": ("embedded", "pretrained"),
    "model.backend": ("transformer_lens", "hf"),
    "dataset.source": ("embedded", "hf"),
    "sae.b_dec_init": ("mean", "geometric_median", "zeros"),
    "sae.normalize_activations": ("none", "expected_average_only_in"),
}
GROUPS = {
    "architecture": ("standard", "topk", "batchtopk", "matryoshka_batchtopk", "gated", "jumprelu"),
    "model": ("smollm2-135m", "smollm2-135m-hf", "gpt2"),
    "dataset": ("shakespeare", "openwebtext"),
    "optimizer": ("adam", "adamw"),
    "scheduler": ("constant", "cosine", "warmup_decay"),
    "logger": ("none", "wandb"),
}
NODES = ("training", "buffer", "activations", "eval", "sae", "optimizer", "model", "dataset")
MALFORMED = ["sae.k=[1,", "=3", "sae..k=1", "sae.k=)", "training.seed={a", "'x=1", "sae.k=1=", "+=1", "~"]


def value_out_of_domain() -> st.SearchStrategy[list[str]]:
    return st.one_of(
        st.tuples(st.sampled_from(POSITIVE_INTS), NON_POSITIVE).map(lambda kv: [f"{kv[0]}={kv[1]}"]),
        st.tuples(st.sampled_from(NON_NEGATIVE_INTS), NEGATIVE).map(lambda kv: [f"{kv[0]}={kv[1]}"]),
        st.tuples(
            st.sampled_from(POSITIVE_FLOATS),
            st.one_of(st.floats(max_value=0, allow_nan=False), st.just("nan"), st.just("-inf")),
        ).map(lambda kv: [f"{kv[0]}={kv[1]}"]),
        st.floats(allow_nan=False, allow_infinity=False)
        .filter(lambda f: not 0 <= f < 1)
        .map(lambda f: [f"dataset.holdout_fraction={f}"]),
        st.integers(max_value=1).map(lambda n: [f"dataset.context_size={n}"]),
    )


def wrong_type() -> st.SearchStrategy[list[str]]:
    keys = POSITIVE_INTS + NON_NEGATIVE_INTS + POSITIVE_FLOATS + ["training.seed", "dataset.holdout_fraction"]
    return st.one_of(
        st.tuples(st.sampled_from(keys), NOT_A_NUMBER).map(lambda kv: [f"{kv[0]}={kv[1]}"]),
        st.tuples(st.sampled_from(POSITIVE_INTS), st.floats(min_value=1.01, max_value=1e6).filter(lambda f: f % 1)).map(
            lambda kv: [f"{kv[0]}={kv[1]}"]
        ),
        st.sampled_from(["training.exclude_bos=maybe", "activations.exclude_bos=2", "dataset.shuffle=perhaps"]).map(
            lambda o: [o]
        ),
    )


def bad_choice() -> st.SearchStrategy[list[str]]:
    return (
        st.tuples(st.sampled_from(sorted(CHOICES)), WORDS)
        .filter(lambda kv: kv[1] not in CHOICES[kv[0]])
        .map(lambda kv: [f"{kv[0]}={kv[1]}"])
    )


def bad_group_option() -> st.SearchStrategy[list[str]]:
    return (
        st.tuples(st.sampled_from(sorted(GROUPS)), WORDS)
        .filter(lambda kv: kv[1] not in GROUPS[kv[0]])
        .map(lambda kv: [f"{kv[0]}={kv[1]}"])
    )


def unknown_key() -> st.SearchStrategy[list[str]]:
    return st.tuples(st.sampled_from(NODES), WORDS.map(lambda w: f"zz_{w}"), st.integers()).map(
        lambda kv: [f"{kv[0]}.{kv[1]}={kv[2]}"]
    )


def bad_path(tmp: Path) -> st.SearchStrategy[list[str]]:
    """Paths that cannot be used: under a regular file, or a model directory that is not there."""
    a_file = tmp / "a_file"
    a_file.write_text("not a directory\n")
    return st.tuples(st.sampled_from(["cache_dir", "activations.cache_dir", "model.name", "dataset.path"]), WORDS).map(
        lambda kv: (
            [f"{kv[0]}={a_file}/{kv[1]}"]
            + (["model.source=pretrained"] if kv[0] == "model.name" else [])
            + (["dataset.source=hf"] if kv[0] == "dataset.path" else [])
        )
    )


# --- the tests ----------------------------------------------------------------------------------


def aim(run_dirs: dict[str, Path], which: int) -> Path:
    return run_dirs["finished" if which % 2 == 0 else "interrupted"]


@pytest.mark.parametrize(
    "strategy, n",
    [
        (value_out_of_domain, 60),
        (wrong_type, 40),
        (bad_choice, 30),
        (bad_group_option, 25),
        (unknown_key, 20),
    ],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_train_refuses_generated_bad_values_and_touches_no_run_dir(run, run_dirs, strategy, n):
    before = {name: snapshot(d) for name, d in run_dirs.items()}
    seen: set[tuple[str, ...]] = set()

    @cases(n)
    @given(overrides=strategy(), which=st.integers(0, 1))
    def case(overrides: list[str], which: int) -> None:
        seen.add(tuple(overrides))
        argv = [*run, *overrides, f"hydra.run.dir={aim(run_dirs, which)}"]
        code, out = run_in_process(saesweep.train.cli, argv)
        assert_refused(code, out, run_dirs, before, overrides)

    case()
    print(f"{strategy.__name__}: {len(seen)} distinct cases")  # shown with -s: the count for the record
    assert len(seen) >= n * 0.8, f"{len(seen)} distinct cases of {n}"


def test_train_refuses_malformed_overrides_and_unusable_paths(run, run_dirs, tmp_path):
    before = {name: snapshot(d) for name, d in run_dirs.items()}
    seen: set[tuple[str, ...]] = set()

    @cases(40)
    @given(overrides=st.one_of(st.sampled_from(MALFORMED).map(lambda o: [o]), bad_path(tmp_path)))
    def case(overrides: list[str]) -> None:
        seen.add(tuple(overrides))
        for run_dir in run_dirs.values():
            code, out = run_in_process(saesweep.train.cli, [*run, *overrides, f"hydra.run.dir={run_dir}"])
            assert_refused(code, out, run_dirs, before, overrides)

    case()
    print(f"malformed and paths: {len(seen)} distinct cases")
    assert len(seen) >= 30, f"{len(seen)} distinct cases"


def test_the_other_commands_refuse_generated_bad_inputs(run, run_dirs, tmp_path):
    """evaluate, pretokenize and cache (Hydra apps) and report (argparse), aimed at the run
    dirs or at paths that cannot be used."""
    before = {name: snapshot(d) for name, d in run_dirs.items()}
    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    missing = tmp_path / "missing"
    commands = {
        "evaluate": saesweep.evaluate.cli,
        "pretokenize": saesweep.pretokenize.cli,
        "cache": saesweep.cache.cli,
        "report": saesweep.report.main,
    }

    def evaluate_case(word: str, n: int, run_dir: Path) -> list[str]:
        return [
            [f"sae_path={missing / word}", f"out_dir={run_dir}"],
            [f"sae_path={run_dir / 'sae'}", f"out_dir={run_dir}", f"eval.rows={-abs(n) - 1}"],
            [f"sae_path={run_dir / 'sae'}", f"out_dir={run_dir}", f"device={word}"],
            [f"sae_path={run_dir / 'sae'}", f"hydra.run.dir={run_dir}", f"eval.zz_{word}=1"],
            [f"sae_path={run_dir / 'sae'}", f"out_dir={a_file}/{word}"],
        ][n % 5]

    def pretokenize_case(word: str, n: int, run_dir: Path) -> list[str]:
        return [
            [f"pretokenize.output_path={run_dir}", f"hydra.run.dir={run_dir}"],  # exists: refused
            [f"pretokenize.output_path={missing / word}", f"pretokenize.max_rows={-abs(n) - 1}"],
            [f"pretokenize.output_path={a_file}/{word}"],
            ["pretokenize.output_path=null", f"hydra.run.dir={run_dir}"],
            [f"pretokenize.output_path={missing / word}", f"dataset.context_size={-abs(n)}"],
        ][n % 5]

    def cache_case(word: str, n: int, run_dir: Path) -> list[str]:
        return [
            [*run, f"activations.cache_tokens={-abs(n) - 1}", f"hydra.run.dir={run_dir}"],
            [*run, f"activations.cache_hooks=[{word}]", f"activations.cache_dir={a_file}/{word}"],
            [*run, f"activations.shard_mb={-abs(n)}", f"hydra.run.dir={run_dir}"],
            [*run, f"architecture={word}x", f"hydra.run.dir={run_dir}"],
        ][n % 4]

    def report_case(word: str, n: int, run_dir: Path) -> list[str]:
        return [
            [str(missing / word)],
            [str(a_file)],
            [str(run_dir), "--out", f"{a_file}/{word}"],
            [str(run_dir), f"--{word}"],
            [],
        ][n % 5]

    argvs = {"evaluate": evaluate_case, "pretokenize": pretokenize_case, "cache": cache_case, "report": report_case}
    seen: set[tuple[str, ...]] = set()

    @cases(90)
    @given(command=st.sampled_from(sorted(commands)), word=WORDS, n=st.integers(0, 10**6), which=st.integers(0, 1))
    def case(command: str, word: str, n: int, which: int) -> None:
        argv = argvs[command](word, n, aim(run_dirs, which))
        seen.add((command, *argv))
        code, out = run_in_process(commands[command], argv)
        assert_refused(code, out, run_dirs, before, (command, argv))

    case()
    print(f"other commands: {len(seen)} distinct cases")
    assert len(seen) >= 50, f"{len(seen)} distinct cases"
