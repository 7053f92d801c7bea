"""Sweeps through Hydra's submitit launcher on a real (one-node) SLURM cluster.

The cluster tests need `bash tests/slurm/cluster.sh start` (root) and SAESWEEP_SLURM=1;
without that variable they are skipped, with it a cluster that does not answer is a
failure, not a skip. CI: .ci/run. The partition is $SAESWEEP_SLURM_PARTITION (default
"debug", as cluster.sh). Jobs train the embedded model on CPU, ~30-60 s each, 2 at a time
on a 2-CPU machine.

The first test needs no cluster: it renders the batch script the `slurm` preset produces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, run_cli, wait_until_training
from omegaconf import OmegaConf
from safetensors.torch import load_file

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PARTITION = os.environ.get("SAESWEEP_SLURM_PARTITION", "debug")
ON_CLUSTER = os.environ.get("SAESWEEP_SLURM") == "1"

# Fits the test cluster: 1 CPU and 3 GB per job, no GPU. timeout_min must stay > 10 (see
# conf/hydra/launcher/slurm.yaml), or a preemption would count as a timeout.
LAUNCHER = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.timeout_min=15",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=3",
    "hydra.launcher.gpus_per_node=null",
]
SWEEP_TIMEOUT_S = 1200  # hard stop for a wedged sweep; a healthy one takes ~2-3 min


def test_slurm_preset_renders_the_batch_script(tmp_path, monkeypatch):
    """The preset's fields reach sbatch the way the launcher passes them (no cluster needed)."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    # The executor refuses to exist where no `srun` is on PATH; rendering needs no cluster.
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    from hydra import compose, initialize_config_dir
    from submitit.slurm.slurm import _make_sbatch_string

    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    # as hydra_submitit_launcher's BaseSubmititLauncher.launch builds its executor
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = _make_sbatch_string(
        command="python -m x", folder=executor.folder, map_count=3, **executor._executor.parameters
    )
    for line in (
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=120",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --array=0-2%3",
        "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK",
    ):
        assert line in script, (line, script)
    assert "--partition" not in script  # null: the cluster's default partition


@pytest.fixture(scope="module")
def cluster():
    """The test cluster must answer; with SAESWEEP_SLURM=1 anything else is a failure."""
    for tool in ("sinfo", "sbatch", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not on PATH: run 'bash tests/slurm/cluster.sh start' as root")
    state = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True)
    if state.returncode != 0 or not set(state.stdout.split()) & {"idle", "mixed", "allocated", "completing"}:
        pytest.fail(
            f"partition {PARTITION!r} not usable ({state.stdout.strip() or state.stderr.strip()}): "
            "run 'bash tests/slurm/cluster.sh start' as root"
        )
    # submitit's only source of job states; the real sacct fails without slurmdbd, and then a
    # job that dies without a result file would leave the sweep waiting forever.
    probe = subprocess.run(
        ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", "1"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.fail(f"sacct fails ({probe.stderr.strip()}); cluster.sh installs a stand-in in /usr/local/bin")
    return PARTITION


def submitit_logs(sweep_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(sweep_dir.glob(".submitit/*/*_log.*")))


@pytest.mark.slurm
@pytest.mark.skipif(not ON_CLUSTER, reason="needs SAESWEEP_SLURM=1 and tests/slurm/cluster.sh start")
def test_architecture_by_k_sweep_on_slurm(cluster, tiny_lm, tmp_path):
    """The design's sweep, `architecture=topk,batchtopk sae.k=...`: six jobs, six rows, six points."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        "saesweep.train",
        "--multirun",
        *LAUNCHER,
        f"hydra.sweep.dir={sweep_dir}",
        "architecture=topk,batchtopk",
        "sae.k=4,8,16",
        *tiny_lm,
        *TINY_RUN,
        cwd=tmp_path,
        timeout=SWEEP_TIMEOUT_S,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:], submitit_logs(sweep_dir)[-4000:])
    members = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    assert [p.name for p in members] == [str(i) for i in range(6)]
    l0 = {}
    for member in members:
        overrides = (member / ".hydra" / "overrides.yaml").read_text()
        arch = "batchtopk" if "architecture=batchtopk" in overrides else "topk"
        k = next(k for k in (4, 8, 16) if f"sae.k={k}\n" in overrides)
        result = json.loads((member / "eval.json").read_text())
        assert result["tokens_trained"] == 8192
        l0[arch, k] = result["l0"]
    assert len(l0) == 6
    # Each member trained its own k: TopK has exactly k active latents, BatchTopK about k.
    for k in (4, 8, 16):
        assert l0["topk", k] <= k
    assert [l0["batchtopk", k] for k in (4, 8, 16)] == sorted(l0["batchtopk", k] for k in (4, 8, 16))
    # They ran as SLURM array tasks, not locally.
    assert len(list(sweep_dir.glob(".submitit/*_*/*_log.out"))) == 6, sorted(sweep_dir.glob(".submitit/*"))
    # The sweep report, written by the Hydra callback when the multirun ended.
    rows = [
        line
        for line in (sweep_dir / "report.md").read_text().splitlines()
        if line.startswith("| ") and "| done |" in line
    ]
    assert len(rows) == 6, rows
    assert (sweep_dir / "pareto.png").stat().st_size > 0


@pytest.mark.slurm
@pytest.mark.skipif(not ON_CLUSTER, reason="needs SAESWEEP_SLURM=1 and tests/slurm/cluster.sh start")
def test_a_failing_member_fails_the_sweep_and_is_named(cluster, tiny_lm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        "saesweep.train",
        "--multirun",
        *LAUNCHER,
        f"hydra.sweep.dir={sweep_dir}",
        "sae.k=4,0",
        *tiny_lm,
        *TINY_RUN,
        cwd=tmp_path,
        timeout=SWEEP_TIMEOUT_S,
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    # Hydra names the failing member by its overrides, then re-raises the member's own
    # exception (pickled back from the job) in the launching process.
    assert "Error executing job with overrides:" in output and "'sae.k=0'" in output, output[-4000:]
    assert "config key 'sae.k': must be > 0, got 0" in output, output[-4000:]
    # the good member still finished
    assert (sweep_dir / "0" / "eval.json").exists()


def preempt_once(cmd: list[str], cwd: Path, sweep_dir: Path) -> tuple[subprocess.Popen, str, str, str]:
    """Start a one-member sweep, send its job USR2 (what SLURM sends on preemption) once the
    member trains, and wait for the sweep: (process, stdout, stderr, job id)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = None
    try:
        wait_until_training(proc, sweep_dir / "0" / "metrics.jsonl")
        (job_dir,) = (sweep_dir / ".submitit").glob("[0-9]*")  # one member: a plain job, not an array
        job_id = job_dir.name
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        out, err = proc.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        if proc.poll() is None:  # a failed assertion or a timeout: leave nothing behind
            proc.kill()
            if job_id:
                subprocess.run(["scancel", job_id])
    return proc, out, err, job_id


@pytest.mark.slurm
@pytest.mark.skipif(not ON_CLUSTER, reason="needs SAESWEEP_SLURM=1 and tests/slurm/cluster.sh start")
def test_preempted_member_is_requeued_and_resumes(cluster, tmp_path):
    """USR2 (what SLURM sends on preemption): checkpoint, requeue, continue, finish."""
    sweep_dir = tmp_path / "sweep"
    run = [o for o in TINY_RUN if not o.startswith("training.total_tokens=")] + ["training.total_tokens=32768"]
    cmd = [
        sys.executable,
        "-m",
        "saesweep.train",
        "--multirun",
        *LAUNCHER,
        f"hydra.sweep.dir={sweep_dir}",
        "sae.k=8",
        *run,
    ]
    proc, out, err, job_id = preempt_once(cmd, tmp_path, sweep_dir)
    assert proc.returncode == 0, (out[-2000:], err[-4000:], submitit_logs(sweep_dir)[-4000:])
    logs = submitit_logs(sweep_dir)
    assert "this job is preempted" in logs, logs[-4000:]
    assert "resuming" in (sweep_dir / "0" / "train.log").read_text()
    result = json.loads((sweep_dir / "0" / "eval.json").read_text())
    assert result["tokens_trained"] == 32768
    job = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in job, job

    # The same config run uninterrupted, with the job's one thread, ends with the same weights.
    plain = run_cli(
        "saesweep.train",
        f"hydra.run.dir={tmp_path / 'plain'}",
        "sae.k=8",
        *run,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    resumed = load_file(str(sweep_dir / "0" / "sae" / "sae_weights.safetensors"))
    uninterrupted = load_file(str(tmp_path / "plain" / "sae" / "sae_weights.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------- data parallel

DDP_LAUNCHER = [
    "hydra/launcher=slurm_ddp",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.timeout_min=15",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=6",
    "hydra.launcher.gpus_per_node=null",  # the test cluster has no GPU: two CPU ranks (gloo)
    "hydra.launcher.tasks_per_node=2",
]


def test_slurm_ddp_preset_asks_one_task_per_gpu_and_uses_a_hydra_launcher_plugin(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm_ddp", "hydra.launcher.gpus_per_node=8", f"hydra.sweep.dir={tmp_path}"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 8 and launcher["nodes"] == 1
    # Hydra instantiates launchers only from the hydra_plugins package. (Compared by name:
    # Hydra's plugin scan may have exec'd a second copy of the submitit launcher's module.)
    assert launcher["_target_"].startswith("hydra_plugins.")
    bases = [f"{c.__module__}.{c.__qualname__}" for c in get_class(launcher["_target_"]).__mro__]
    assert f"{SlurmLauncher.__module__}.{SlurmLauncher.__qualname__}" in bases


@pytest.mark.slurm
@pytest.mark.skipif(not ON_CLUSTER, reason="needs SAESWEEP_SLURM=1 and tests/slurm/cluster.sh start")
def test_preempted_ddp_member_is_requeued_and_resumes_to_the_uninterrupted_weights(cluster, tmp_path):
    """One member as a job of two tasks (two gloo ranks); USR2 reaches both, both stop at the
    same step, rank 0 checkpoints every rank's stream and requeues, the job resumes."""
    sweep_dir = tmp_path / "sweep"
    run = [o for o in TINY_RUN if not o.startswith("training.total_tokens=")] + [
        "training.total_tokens=32768",
        "sae.k=8",
    ]
    cmd = [
        sys.executable,
        "-m",
        "saesweep.train",
        "--multirun",
        *DDP_LAUNCHER,
        f"hydra.sweep.dir={sweep_dir}",
        "training.distributed=ddp",
        *run,
    ]
    proc, out, err, job_id = preempt_once(cmd, tmp_path, sweep_dir)
    assert proc.returncode == 0, (out[-2000:], err[-4000:], submitit_logs(sweep_dir)[-4000:])
    logs = submitit_logs(sweep_dir)
    assert "this job is preempted" in logs and "global_rank=1(2)" in logs, logs[-4000:]
    member = sweep_dir / "0"
    log_text = (member / "train.log").read_text()
    assert "joining 2 ranks as rank 0" in log_text and "as rank 1" not in log_text  # rank 0's log only
    assert "resuming" in log_text
    assert json.loads((member / "eval.json").read_text())["tokens_trained"] == 32768
    job = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in job, job

    # Two ranks under torchrun, never stopped (one thread each, as the job's tasks), end alike.
    plain = run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "saesweep.train",
        "training.distributed=ddp",
        f"hydra.run.dir={tmp_path / 'plain'}",
        *run,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    resumed = load_file(str(member / "sae" / "sae_weights.safetensors"))
    uninterrupted = load_file(str(tmp_path / "plain" / "sae" / "sae_weights.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slurm
@pytest.mark.skipif(not ON_CLUSTER, reason="needs SAESWEEP_SLURM=1 and tests/slurm/cluster.sh start")
def test_the_preset_on_a_gpu_less_node_is_one_line_naming_the_gpu_key(cluster, tmp_path):
    """The preset asks for a GPU; this node has none: sbatch refuses, and the user reads one
    error line naming hydra.launcher.gpus_per_node and what the cluster offers."""
    proc = run_cli(
        "saesweep.train",
        "--multirun",
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={PARTITION}",
        "sae.k=8,16",
        *TINY_RUN,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and "hydra.launcher.gpus_per_node" in errors[0], proc.stderr[-3000:]
    assert "the cluster offers partition" in errors[0] and "no GPUs" in errors[0]
