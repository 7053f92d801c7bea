"""The sweep report: loading members, their status, the Pareto front, the outputs, the CLI, the callback."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from saesweep.errors import UserError
from saesweep.report import main
from saesweep.sweep.report import (
    SweepReportCallback,
    differing_overrides,
    load_sweep,
    pareto_front,
    report_rows,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

EVAL_0 = {
    "l0": 16.0,
    "explained_variance": 0.71,
    "mse": 0.0123,
    "dead_fraction": 0.05,
    "ce_loss_score": 0.82,
    "ce_clean": 3.1,
    "tokens_trained": 1000000,
    "tokens_per_second": 12345.6,
}
EVAL_1 = {
    "l0": 32.5,
    "explained_variance": 0.8,
    "mse": 0.009,
    "dead_fraction": 0.0,
    "ce_loss_score": 0.9,
    "tokens_trained": 1000000,
    "tokens_per_second": 11000.0,
}  # no ce_clean: extra keys are ignored


def make_member(
    sweep: Path,
    name: str,
    overrides: list[str] | None = None,
    architecture: str | None = None,
    eval_json: dict | str | None = None,
    log: str | None = None,
) -> Path:
    d = sweep / name
    d.mkdir(parents=True)
    if overrides is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"sae": {"architecture": architecture, "k": 1}}))
    if eval_json is not None:
        (d / "eval.json").write_text(eval_json if isinstance(eval_json, str) else json.dumps(eval_json))
    if log is not None:
        (d / "train.log").write_text(log)
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    """4 members, 2 architectures: 0 and 1 done, 2 failed (a Traceback in its log), 3 running (a log, no eval.json)."""
    s = tmp_path / "multirun" / "2026-11-23" / "14-00-00"
    info = "[2026-11-23 14:00:01,000][saesweep.training.loop][INFO] - training topk\n"
    make_member(s, "0", ["architecture=topk", "sae.k=16", "training.total_tokens=1000000"], "topk", EVAL_0, info)
    make_member(
        s,
        "1",
        ["architecture=batchtopk", "sae.k=32", "training.total_tokens=1000000", "optimizer.lr=1e-3"],
        "batchtopk",
        EVAL_1,
        info,
    )
    make_member(
        s,
        "2",
        ["architecture=topk", "sae.k=64", "training.total_tokens=1000000"],
        "topk",
        log=info
        + (
            'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: CUDA out of memory\n'
        ),
    )
    # "error" inside an INFO message is not a failure.
    make_member(
        s,
        "3",
        ["architecture=batchtopk", "sae.k=128", "training.total_tokens=1000000"],
        "batchtopk",
        log=info + "[2026-11-23 14:00:02,000][saesweep][INFO] - mean squared error is tracked\n",
    )
    (s / "multirun.yaml").write_text("hydra: {}\n")
    return s


def test_load_sweep_status_and_fields(sweep):
    members = load_sweep(sweep)
    assert [(m.name, m.status, m.architecture) for m in members] == [
        ("0", "done", "topk"),
        ("1", "done", "batchtopk"),
        ("2", "failed", "topk"),
        ("3", "running", "batchtopk"),
    ]
    assert members[0].metrics == {k: float(v) for k, v in EVAL_0.items() if k != "ce_clean"}
    assert members[2].reason == "train.log: RuntimeError: CUDA out of memory"
    assert members[3].reason == "" and members[3].metrics == {}


def test_differing_overrides(sweep):
    # total_tokens is the same everywhere; optimizer.lr is set in one member only, which counts as different.
    assert differing_overrides([m.overrides for m in load_sweep(sweep)]) == ["architecture", "sae.k", "optimizer.lr"]


def test_members_sorted_numerically_and_odd_entries_tolerated(tmp_path):
    s = tmp_path / "sweep"
    for i in (10, 2, 0):
        make_member(s, str(i), ["sae.k=1"], "topk", EVAL_0)
    make_member(s, "1", None, eval_json="{not json")  # no .hydra, corrupt eval.json
    make_member(s, "3", ["sae.k=1"], "topk", eval_json="[1, 2]")
    status_dir = make_member(s, "4", ["sae.k=2"], "topk")
    (status_dir / "status.json").write_text('{"status": "failed", "error": "UserError: bad"}')
    for junk in (".submitit/123", "report_old", "pareto"):
        (s / junk).mkdir(parents=True)
    for junk in ("multirun.yaml", "report.csv", "report.md", "pareto.png"):
        (s / junk).write_text("")
    members = load_sweep(s)
    assert [m.name for m in members] == ["0", "1", "2", "3", "4", "10"]
    by_name = {m.name: m for m in members}
    assert by_name["1"].status == "failed" and by_name["1"].reason.startswith("eval.json unreadable: Expecting")
    assert by_name["1"].overrides is None and by_name["1"].architecture is None
    assert (
        by_name["3"].status == "failed" and by_name["3"].reason == "eval.json unreadable: holds a list, not an object"
    )
    assert by_name["4"].status == "failed" and by_name["4"].reason == "status.json: UserError: bad"
    # The member without .hydra has unknown overrides, not "every key missing".
    assert differing_overrides([m.overrides for m in members]) == ["sae.k"]
    write_report(s)  # the full report copes with all of the above
    assert (s / "report.csv").read_text().count("\n") == 7


@pytest.mark.parametrize(
    "log,status",
    [
        ("[2026-11-23 14:00:00,000][saesweep][ERROR] - disk full\n", "failed"),
        ("error: 'sae.k' must be a positive integer\n", "failed"),
        ("[2026-11-23 14:00:00,000][saesweep][INFO] - reconstruction error 0.1\n", "running"),
        ("", "pending"),
    ],
)
def test_status_from_log(tmp_path, log, status):
    make_member(tmp_path, "0", ["sae.k=1"], "topk", log=log)
    (member,) = load_sweep(tmp_path)
    assert member.status == status and bool(member.reason) == (status == "failed")


@pytest.mark.parametrize(
    "points,front",
    [
        ([(10, 0.5), (20, 0.7), (15, 0.4), (30, 0.7), (5, 0.1)], [4, 0, 1]),
        ([], []),
        ([(1, 1)], [0]),
        ([(1, 1), (1, 1), (2, 0.5)], [0, 1]),  # equal points both stay; (2, 0.5) is dominated
        ([(1, 0.5), (1, 0.7)], [1]),  # same x, higher y wins
    ],
)
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def test_csv_and_md(sweep, tmp_path):
    out = tmp_path / "out"
    assert write_report(sweep, out) == out / "report.md"
    assert (out / "report.csv").read_text() == (
        "member,status,architecture,sae.k,optimizer.lr,"
        "l0,explained_variance,mse,dead_fraction,ce_loss_score,tokens_trained,tokens_per_second,reason\n"
        "0,done,topk,16,,16,0.71,0.0123,0.05,0.82,1000000,12345.6,\n"
        "1,done,batchtopk,32,1e-3,32.5,0.8,0.009,0,0.9,1000000,11000,\n"
        "2,failed,topk,64,,,,,,,,,train.log: RuntimeError: CUDA out of memory\n"
        "3,running,batchtopk,128,,,,,,,,,\n"
    )
    md = (out / "report.md").read_text().splitlines()
    assert md[0] == f"# Sweep report: {sweep}"
    assert md[2] == "4 members: 2 done, 1 failed, 1 running, 0 pending"
    assert md[4] == (
        "| member | status | architecture | sae.k | optimizer.lr | l0 | "
        "explained_variance | mse | dead_fraction | ce_loss_score | tokens_trained | tokens_per_second "
        "| reason |"
    )
    assert md[6] == "| 0 | done | topk | 16 |  | 16.0 | 0.7100 | 0.0123 | 0.050 | 0.8200 | 1,000,000 | 12,346 |  |"
    assert md[8] == "| 2 | failed | topk | 64 |  |  |  |  |  |  |  |  | train.log: RuntimeError: CUDA out of memory |"
    assert len([line for line in md if line.startswith("| ")]) == 5
    assert not (sweep / "report.csv").exists()  # --out is respected
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def test_pareto_png(sweep):
    import matplotlib.pyplot as plt

    write_report(sweep)
    width, height = png_size(sweep / "pareto.png")
    assert width > 800 and height > 400
    image = plt.imread(sweep / "pareto.png")
    assert image.shape[:2] == (height, width) and image.std() > 0.05  # not a blank canvas


def test_no_finished_runs_still_writes_everything(tmp_path):
    s = tmp_path / "sweep"
    make_member(s, "0", ["sae.k=1"], "topk")
    write_report(s)
    assert "1 members: 0 done, 0 failed, 0 running, 1 pending" in (s / "report.md").read_text()
    png_size(s / "pareto.png")


def test_load_sweep_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sweep(tmp_path / "missing")
    (tmp_path / "multirun.yaml").write_text("")
    with pytest.raises(UserError, match="has no member subdirectories"):
        load_sweep(tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        load_sweep(tmp_path / "multirun.yaml")


def test_cli_missing_dir_is_one_line_error():
    proc = subprocess.run(
        [sys.executable, "-m", "saesweep.report", "/nonexistent"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "/nonexistent" in lines[0], proc.stderr


def test_cli_writes_report(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "o" / "report.md"), str(tmp_path / "o" / "report.html")]
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"report.csv", "report.md", "pareto.png", "report.html"}


def test_callback_writes_report(sweep):
    SweepReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "report.md").exists() and (sweep / "report.csv").exists() and (sweep / "pareto.png").exists()
    assert (sweep / "report.html").exists()


def test_callback_failure_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="saesweep.sweep.report"):
        SweepReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "no")}}}))
    assert "sweep report not written" in caplog.text


def test_callback_in_a_real_multirun(tmp_path):
    """Hydra's basic sweeper skips on_multirun_end when a member fails; on_job_end covers it."""
    (tmp_path / "app.py").write_text(
        textwrap.dedent("""
        import hydra

        @hydra.main(version_base="1.3", config_path=None, config_name=None)
        def main(cfg):
            if cfg.x == 2:
                raise ValueError("x=2 is bad")
            (__import__("pathlib").Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
             / "eval.json").write_text('{"l0": %d, "explained_variance": 0.5}' % (10 * cfg.x))

        main()
    """)
    )
    proc = subprocess.run(
        [
            sys.executable,
            "app.py",
            "--multirun",
            "+x=1,2,3",
            "hydra.sweep.dir=sw",
            "+hydra.callbacks.sweep_report._target_=saesweep.sweep.report.SweepReportCallback",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "x=2 is bad" in proc.stderr  # the sweep itself still fails
    assert (tmp_path / "sw" / "1" / "status.json").exists()  # member 1 ran x=2
    assert (tmp_path / "sw" / "report.md").read_text().splitlines()[
        2
    ] == "3 members: 2 done, 1 failed, 0 running, 0 pending"
    assert "1,failed,,2,,,,,,,,status.json: ValueError: x=2 is bad" in (tmp_path / "sw" / "report.csv").read_text()


def test_callback_ignores_single_runs(sweep):
    config = OmegaConf.create({"hydra": {"mode": "RUN", "sweep": {"dir": str(sweep)}}})
    SweepReportCallback().on_job_end(config, job_return=None)
    assert not (sweep / "report.md").exists()


def test_architecture_override_column_only_when_it_says_something(tmp_path):
    # A group option named after its architecture repeats the architecture column: dropped.
    make_member(tmp_path, "0", ["architecture=topk"], "topk", eval_json=EVAL_1)
    make_member(tmp_path, "1", ["architecture=batchtopk"], "batchtopk", eval_json=EVAL_1)
    columns, _ = report_rows(load_sweep(tmp_path))
    assert "architecture (override)" not in columns
    # A user's own option (conf/architecture/wide_topk.yaml selecting topk) is kept.
    make_member(tmp_path, "2", ["architecture=wide_topk"], "topk", eval_json=EVAL_1)
    columns, rows = report_rows(load_sweep(tmp_path))
    assert [r["architecture (override)"] for r in rows] == ["topk", "batchtopk", "wide_topk"]


def test_report_without_a_dir_or_with_an_unknown_flag_is_one_error_line(capsys):
    from saesweep.report import main

    for argv in ([], ["somewhere", "--colour"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
