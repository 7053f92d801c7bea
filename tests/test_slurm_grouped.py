"""hydra/launcher=slurm_grouped: the sweep partitioned into SLURM jobs that share an LM pass.

The plan (saesweep.sweep.jobs) and the preset's composition are tested here without a
cluster; the cluster tests (SAESWEEP_SLURM=1, see tests/test_slurm.py) run real sweeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, TINY_RUN, wait_until_training, weights
from test_slurm import cluster  # noqa: F401  (the fixture: with SAESWEEP_SLURM=1 the cluster must answer)

from saesweep.sweep.jobs import (
    GB,
    PlanError,
    PlannedMember,
    buffer_bytes,
    job_bytes,
    lm_bytes,
    plan_jobs,
    plan_record,
    plan_text,
    sae_bytes,
)


def member(number, shared="a", hook="blocks.1", member_bytes=GB, buffer=GB, overrides=None):
    return PlannedMember(number, tuple(overrides or [f"sae.k={number}"]), shared, hook, member_bytes, buffer)


def test_memory_estimates_by_hand():
    # d_in 2, d_sae 3: params 2*2*3 + 3 + 2 = 17; 4 copies + a batch of 5 x 3 three times.
    assert sae_bytes(2, 3, 5) == 4 * (4 * 17 + 3 * 5 * 3)
    # The buffer holds at least two batches.
    assert buffer_bytes(10, 2, 3) == 4 * 10 * 3 and buffer_bytes(10, 8, 3) == 4 * 16 * 3
    # buffer.size_tokens=auto fits itself into what the job's device has left: its minimum.
    assert buffer_bytes("auto", 8, 3) == 4 * 16 * 3
    # The LM once, a buffer per hook point, every member.
    members = [member(0, hook="h1"), member(1, hook="h1"), member(2, hook="h2", buffer=2 * GB)]
    assert job_bytes(members, 5 * GB) == 5 * GB + 1 * GB + 2 * GB + 3 * GB
    # GPT-2-like config: 2 layers of d 4 (MLP 16), vocab 10, tied embeddings, fp32.
    gpt2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 4, "vocab_size": 10}
    assert lm_bytes(gpt2, 4) == 4 * (2 * (4 * 16 + 2 * 4 * 16) + 10 * 4)
    llama = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4, "intermediate_size": 8}
    assert lm_bytes({**llama, "vocab_size": 10, "tie_word_embeddings": False}, 2) == 2 * (4 * 16 + 3 * 4 * 8 + 2 * 40)
    assert lm_bytes({"n_layer": 2}, 4) == 0  # says too little: unknown


def test_members_that_may_share_an_lm_pass_share_a_job():
    members = [member(0), member(1, shared="b"), member(2), member(3, shared="b")]
    jobs = plan_jobs(members, members_per_job=None, device_memory_bytes=None, lm_bytes=0)
    assert [j.numbers for j in jobs] == [[0, 2], [1, 3]]
    assert [j.group for j in jobs] == [0, 1]
    assert "group 0 (2 member(s) that may share one LM pass)" in jobs[0].why


def test_members_per_job_splits_a_group_in_sweep_order():
    members = [member(i) for i in range(7)]
    jobs = plan_jobs(members, members_per_job=3, device_memory_bytes=None, lm_bytes=0)
    assert [j.numbers for j in jobs] == [[0, 1, 2], [3, 4, 5], [6]]
    assert "split into 3 jobs by members_per_job=3" in jobs[0].why
    assert jobs[0].why.endswith("full by members_per_job") and "full by" not in jobs[2].why


def test_device_memory_splits_a_group_and_counts_the_lm_and_each_hook_buffer_once():
    # LM 4 GB; each member 1 GB plus its hook's 1 GB buffer. Budget 8 GB:
    # one hook: 4 + 1 + 3 x 1 = 8 fits three; two hooks in a job cost a second buffer.
    same_hook = [member(i) for i in range(5)]
    jobs = plan_jobs(same_hook, members_per_job=None, device_memory_bytes=8 * GB, lm_bytes=4 * GB)
    assert [j.numbers for j in jobs] == [[0, 1, 2], [3, 4]]
    assert [j.device_bytes for j in jobs] == [8 * GB, 7 * GB]
    assert "device_memory_gb=8" in jobs[0].why and jobs[0].why.endswith("full by device_memory_gb")
    two_hooks = [member(0, hook="h1"), member(1, hook="h2"), member(2, hook="h1")]
    jobs = plan_jobs(two_hooks, members_per_job=None, device_memory_bytes=8 * GB, lm_bytes=4 * GB)
    assert [j.numbers for j in jobs] == [[0, 1], [2]]  # 4 + 2 buffers + 2 members = 8
    # Both limits: whichever is hit first.
    jobs = plan_jobs(same_hook, members_per_job=2, device_memory_bytes=8 * GB, lm_bytes=4 * GB)
    assert [j.numbers for j in jobs] == [[0, 1], [2, 3], [4]]


def test_the_plan_is_deterministic_and_records_every_member():
    members = [member(i, shared="ab"[i % 2]) for i in range(6)]
    first = plan_jobs(members, 2, 100 * GB, GB)
    again = plan_jobs(list(members), 2, 100 * GB, GB)
    assert [(j.numbers, j.why) for j in first] == [(j.numbers, j.why) for j in again]
    record = plan_record(first, [member(9)], array_parallelism=16)
    assert [m["member"] for m in record["members"]] == [0, 1, 2, 3, 4, 5, 9]
    assert {m["member"]: m["job"] for m in record["members"]} == {0: 0, 2: 0, 4: 1, 1: 2, 3: 2, 5: 3, 9: None}
    assert record["finished"] == [9] and json.loads(json.dumps(record)) == record
    text = plan_text(first, [member(9)])
    assert text.splitlines()[0] == "slurm_grouped plan: 6 member(s) in 4 job(s)"
    assert "  job 1: members 4 - group 0" in text and "    #4 : sae.k=4" in text
    assert "finished already (eval.json), not submitted: 9" in text


def test_settings_no_plan_can_meet_name_the_key_and_the_member():
    with pytest.raises(PlanError, match=r"'hydra.launcher.members_per_job': must be >= 1.*got 0"):
        plan_jobs([member(0)], 0, None, 0)
    with pytest.raises(PlanError, match=r"'hydra.launcher.device_memory_gb': must be > 0"):
        plan_jobs([member(0)], None, -GB, 0)
    big = member(3, member_bytes=6 * GB, overrides=["sae.expansion_factor=256"])
    with pytest.raises(PlanError) as e:
        plan_jobs([member(0), big], None, 8 * GB, 2 * GB)
    message = str(e.value)
    assert "member 3 (sae.expansion_factor=256) needs an estimated 9.00 GB alone" in message
    assert "LM 2.00 GB" in message and "device_memory_gb=8" in message


def compose_launcher(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm_grouped", f"hydra.sweep.dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_the_preset_is_slurm_yaml_plus_the_grouped_launchers_rules(tmp_path):
    from hydra_plugins.saesweep_grouped_launcher.grouped_launcher import GroupedLauncherConf

    launcher = compose_launcher(tmp_path, "hydra.launcher.members_per_job=3")
    assert launcher["_target_"].startswith("hydra_plugins.saesweep_slurm_grouped_launcher.")
    assert launcher["may_differ"] == GroupedLauncherConf().may_differ
    assert launcher["members_per_job"] == 3 and launcher["device_memory_gb"] is None
    # Every SLURM field as slurm.yaml has it (the preset repeats them: a launcher preset
    # cannot extend another of a different schema).
    slurm = {k: v for k, v in compose_launcher(tmp_path, "hydra/launcher=slurm").items() if k != "_target_"}
    assert "members_per_job" not in slurm and slurm["gpus_per_node"] == 1
    assert {k: launcher[k] for k in slurm} == slurm


def test_the_report_marks_members_of_running_jobs_pending_running_failed_or_done(tmp_path):
    """While jobs run: done (eval.json), failed (the failure record the group writes), running
    (metrics or a checkpoint, no eval.json), pending (planned, nothing written: no dir yet,
    or a dir its job has only just made)."""
    from saesweep.report import main as report
    from saesweep.sweep.jobs import plan_record

    sweep = tmp_path / "sweep"
    members = [member(i, overrides=[f"sae.k={4 * 2**i}"]) for i in range(5)]
    jobs = plan_jobs(members, members_per_job=3, device_memory_bytes=None, lm_bytes=0)
    sweep.mkdir()
    (sweep / "slurm_grouped_plan.json").write_text(json.dumps(plan_record(jobs, [], 16)))
    for i in range(4):
        (sweep / str(i) / ".hydra").mkdir(parents=True)
        (sweep / str(i) / ".hydra" / "overrides.yaml").write_text(f"- sae.k={4 * 2**i}\n")
    (sweep / "0" / "eval.json").write_text(json.dumps({"l0": 4.0, "explained_variance": 0.5}))
    (sweep / "1" / "metrics.jsonl").write_text('{"step": 2, "tokens": 2048}\n')
    (sweep / "2" / "checkpoint.pt").write_bytes(b"")
    (sweep / "2" / "status.json").write_text(json.dumps({"status": "failed", "error": "UserError: training diverged"}))
    # member 3: only its .hydra/ so far; member 4: its job has not started (no dir)
    assert report([str(sweep)]) == 0
    rows = [line.split(",") for line in (sweep / "report.csv").read_text().splitlines()]
    columns = rows[0]
    got = {r[0]: (r[1], r[columns.index("sae.k")]) for r in rows[1:]}
    assert got == {
        "0": ("done", "4"),
        "1": ("running", "8"),
        "2": ("failed", "16"),
        "3": ("pending", "32"),
        "4": ("pending", "64"),
    }
    assert "5 members: 1 done, 1 failed, 1 running, 2 pending" in (sweep / "report.md").read_text()
    assert "training diverged" in (sweep / "report.csv").read_text()


# ------------------------------------------------------------------------- on the cluster

PARTITION = os.environ.get("SAESWEEP_SLURM_PARTITION", "debug")
ON_CLUSTER = os.environ.get("SAESWEEP_SLURM") == "1"
LAUNCHER = [
    "hydra/launcher=slurm_grouped",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.timeout_min=15",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=3",
    "hydra.launcher.gpus_per_node=null",
]
TIMEOUT_S = 900
# The acceptance grid: 3 k x 2 hook points (members 0, 1: k=4 at either hook; ...), planned
# as 2 jobs of 3 members: by members_per_job where hook points may share an LM pass, by
# hook point where they may not.
GRID = ["sae.k=4,8,16", "model.hook_point=blocks.0.hook_resid_post,blocks.1.hook_resid_post"]


def hooks_share_a_pass() -> bool:
    from hydra_plugins.saesweep_grouped_launcher.grouped_launcher import GroupedLauncherConf

    return "model.hook_point" in GroupedLauncherConf().may_differ


LONGER = [o for o in TINY_RUN if not o.startswith("training.total_tokens=")] + [
    "training.total_tokens=32768",  # long enough to be requeued mid-run
    "training.checkpoint_every_tokens=4096",
]


def sweep_cmd(sweep_dir: Path, tiny_lm: list[str], *args: str) -> list[str]:
    lm = [o for o in tiny_lm if not o.startswith("model.hook_point=")]
    return [sys.executable, "-m", "saesweep.train", "--multirun", *LAUNCHER, f"hydra.sweep.dir={sweep_dir}", *lm, *args]


def run_sweep(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def plan_of(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "slurm_grouped_plan.json").read_text())


def job_logs(sweep_dir: Path, slurm_job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(sweep_dir.glob(f".submitit/{slurm_job_id}/*_log.*")))


def members_of(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slurm
@pytest.mark.skipif(not ON_CLUSTER, reason="needs SAESWEEP_SLURM=1 and tests/slurm/cluster.sh start")
@pytest.mark.usefixtures("cluster")
def test_a_layer_by_k_grid_runs_as_the_planned_jobs_and_a_requeued_job_resumes_exactly(tmp_path, tiny_lm):
    from test_slurm import submitit_logs

    # Uninterrupted: 6 members in the 2 planned jobs, each job one LM pass for its 3 members.
    plain = tmp_path / "plain"
    args = [*GRID, *LONGER, "hydra.launcher.members_per_job=3"]
    proc = run_sweep(sweep_cmd(plain, tiny_lm, *args), tmp_path)
    assert proc.returncode == 0, (proc.stderr[-3000:], submitit_logs(plain)[-3000:])
    assert "slurm_grouped plan: 6 member(s) in 2 job(s)" in proc.stdout + proc.stderr
    plan = plan_of(plain)
    want = [[0, 1, 2], [3, 4, 5]] if hooks_share_a_pass() else [[0, 2, 4], [1, 3, 5]]
    assert [job["members"] for job in plan["jobs"]] == want
    ids = [job["slurm_job_id"] for job in plan["jobs"]]
    array = {i.split("_")[0] for i in ids}
    assert len(array) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1"]  # one array, two tasks
    sacct = subprocess.run(
        ["sacct", "-o", "JobID,State", "--parsable2", "-j", array.pop()], capture_output=True, text=True
    ).stdout
    assert sorted(line for line in sacct.splitlines()[1:] if "." not in line) == sorted(f"{i}|COMPLETED" for i in ids)
    for job_id in ids:
        log = job_logs(plain, job_id)
        assert log.count("Launching 3 jobs as one group (one LM pass)") == 1, log[-3000:]
        assert log.count("training 3 SAE(s)") == 1, log[-3000:]
        if hooks_share_a_pass():  # each job has members at both hooks: still one forward per chunk
            (line,) = [x for x in log.splitlines() if "one LM pass per chunk feeds hooks" in x]
            assert "blocks.0.hook_resid_post" in line and "blocks.1.hook_resid_post" in line, line
    report = subprocess.run(
        [sys.executable, "-m", "saesweep.report", str(plain)], capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0, report.stderr[-2000:]
    rows = [r.split(",") for r in (plain / "report.csv").read_text().splitlines()]
    assert len(rows) == 7 and all(r[1] == "done" and r[rows[0].index("l0")] for r in rows[1:]), rows

    # The same sweep, its first job requeued (scontrol requeue: SIGTERM, then requeued) mid-run.
    sweep = tmp_path / "requeued"
    job_id = None
    process = subprocess.Popen(
        sweep_cmd(sweep, tiny_lm, *args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until_training(process, sweep / "0" / "metrics.jsonl")
        job_id = plan_of(sweep)["jobs"][0]["slurm_job_id"]
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        # The report works while jobs run: every planned member, each pending, running or done.
        report = subprocess.run(
            [sys.executable, "-m", "saesweep.report", str(sweep)], capture_output=True, text=True, timeout=300
        )
        assert report.returncode == 0, report.stderr[-2000:]
        statuses = [r.split(",")[1] for r in (sweep / "report.csv").read_text().splitlines()[1:]]
        assert len(statuses) == 6 and set(statuses) <= {"pending", "running", "done"}, statuses
        out, err = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            if job_id:
                subprocess.run(["scancel", job_id])
    assert process.returncode == 0, (err[-3000:], submitit_logs(sweep)[-3000:])
    job = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in job, job
    log = job_logs(sweep, job_id)
    assert "stopping on signal 15" in log and "SIGTERM: ending this job" in log, log[-3000:]
    for member in map(str, plan["jobs"][0]["members"]):
        assert "resuming" in (sweep / member / "train.log").read_text(), member
    for member in members_of(plain):
        want, got = weights(member), weights(sweep / member.name)
        assert want.keys() == got.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=f"{member.name} {name}")

    # Rerun of the finished sweep: nothing left to submit.
    again = run_sweep(sweep_cmd(sweep, tiny_lm, *args), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert plan_of(sweep)["jobs"] == [] and plan_of(sweep)["finished"] == [0, 1, 2, 3, 4, 5]


@pytest.mark.slurm
@pytest.mark.skipif(not ON_CLUSTER, reason="needs SAESWEEP_SLURM=1 and tests/slurm/cluster.sh start")
@pytest.mark.usefixtures("cluster")
def test_a_diverging_member_fails_alone_and_a_rerun_resubmits_only_it(tmp_path, tiny_lm):
    from test_slurm import submitit_logs

    # Member 0 diverges (lr 1e30; two skipped steps end it), member 1 trains, in one job.
    sweep = tmp_path / "sweep"
    run = [o for o in TINY_RUN if not o.startswith("optimizer.lr=")]
    args = [
        *run,
        "sae.k=8",
        "training.grad_clip_norm=null",
        "training.max_nonfinite_steps=2",
        "optimizer.lr=1e30,4e-3",
    ]
    proc = run_sweep(sweep_cmd(sweep, tiny_lm, "model.hook_point=blocks.1.hook_resid_post", *args), tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "training diverged" in errors[0], (
        proc.stderr[-3000:],
        submitit_logs(sweep)[-3000:],
    )
    (job,) = plan_of(sweep)["jobs"]
    assert job["members"] == [0, 1]
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "failed"
    assert json.loads((sweep / "1" / "eval.json").read_text())["tokens_trained"] == 8192
    assert "1 done, 1 failed" in (sweep / "report.md").read_text()

    rerun = run_sweep(sweep_cmd(sweep, tiny_lm, "model.hook_point=blocks.1.hook_resid_post", *args), tmp_path)
    assert rerun.returncode == 2 and "training diverged" in rerun.stderr, rerun.stderr[-3000:]
    plan = plan_of(sweep)
    assert [j["members"] for j in plan["jobs"]] == [[0]] and plan["finished"] == [1]
    assert "finished already (eval.json), not submitted: 1" in rerun.stdout + rerun.stderr
