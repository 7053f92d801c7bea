"""Wall time of a 2-hook x 3-k sweep on SLURM: one job per member against slurm_grouped.

    bash tests/slurm/cluster.sh start          # as root: the one-node test cluster
    nice -n 10 python benchmarks/bench_slurm_grouped.py            # 65,536 tokens per member
    nice -n 10 python benchmarks/bench_slurm_grouped.py --tokens 32768 --arms slurm grouped3

The same 6 members (model.hook_point at layers 3 and 6 x sae.k=16,32,64, BatchTopK, the
embedded model, live activations) in the same script run, one arm after another:
- `slurm`: hydra/launcher=slurm, one SLURM job per member (each loads the LM and runs it);
- `grouped3`: hydra/launcher=slurm_grouped members_per_job=3, 2 jobs of 3 members;
- `grouped`: hydra/launcher=slurm_grouped, as many members per job as may share an LM pass
  (one job where hook points share a pass, one per hook point where they do not).
Each job asks for 1 CPU and 3 GB, no GPU, so on a 2-CPU node two jobs run at once. Writes
benchmarks/results/slurm_grouped.{json,md}. The issue's bar: one job per member takes at
least 2x the wall time of slurm_grouped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GRID = ["model.hook_point=blocks.3.hook_resid_post,blocks.6.hook_resid_post", "sae.k=16,32,64"]
CLUSTER = [
    f"hydra.launcher.partition={os.environ.get('SAESWEEP_SLURM_PARTITION', 'debug')}",
    "hydra.launcher.timeout_min=60",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=3",
    "hydra.launcher.gpus_per_node=null",
]
ARMS = {
    "slurm": ["hydra/launcher=slurm"],
    "grouped3": ["hydra/launcher=slurm_grouped", "hydra.launcher.members_per_job=3"],
    "grouped": ["hydra/launcher=slurm_grouped"],
}
# Evaluation is per member in every arm; a small one keeps the comparison about training.
EXTRA = ["eval.rows=13", "eval.ce_rows=3", "architecture=batchtopk", "training.batch_size=4096"]


def slurm_jobs(sweep_dir: Path) -> int:
    """SLURM jobs the sweep ran: submitit keeps a folder per array task (`<array>_<task>`,
    beside one for the array itself), or one `<job>` folder for a sweep of a single job."""
    names = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit()]
    tasks = [n for n in names if "_" in n]
    return len(tasks) if tasks else len(names)


def run_arm(arm: str, tokens: int, work: Path) -> dict:
    sweep_dir = work / arm
    cmd = [
        sys.executable,
        "-m",
        "saesweep.train",
        "--multirun",
        *ARMS[arm],
        *CLUSTER,
        *GRID,
        *EXTRA,
        f"training.total_tokens={tokens}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    (work / f"{arm}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{arm} sweep failed ({work / f'{arm}.log'}):\n{proc.stderr[-4000:]}")
    evals = [json.loads((sweep_dir / str(i) / "eval.json").read_text()) for i in range(6)]
    return {
        "arm": arm,
        "launcher": " ".join(ARMS[arm]),
        "wall_s": round(wall, 1),
        "slurm_jobs": slurm_jobs(sweep_dir),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "explained_variance": [round(e["explained_variance"], 4) for e in evals],
        "tokens_trained": [e["tokens_trained"] for e in evals],
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    node = subprocess.run(["sinfo", "-h", "-o", "%N %c CPUs %m MB"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "slurm_node": node}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens per member")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix="bench-slurm-grouped-", dir=os.environ.get("BENCH_DIR")) as tmp:
        results = []
        for arm in args.arms:
            results.append(run_arm(arm, args.tokens, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    per_member = next((r for r in results if r["arm"] == "slurm"), None)
    for r in results:
        r["per_member_over_this"] = round(per_member["wall_s"] / r["wall_s"], 2) if per_member else None
    record = {
        "what": "6 members (2 hook points x 3 k) on the one-node SLURM cluster, wall time of the sweep command",
        "tokens_per_member": args.tokens,
        "grid": GRID,
        "settings": CLUSTER + EXTRA,
        "commit": commit.stdout.strip(),
        "machine": machine(),
        "niced": os.nice(0),
        "arms": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "slurm_grouped.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# One SLURM job per member vs slurm_grouped",
        "",
        f"6 members ({' '.join(GRID)}), {args.tokens:,} tokens each, BatchTopK, the embedded model, "
        f"live activations; each job 1 CPU, 3 GB, no GPU. Commit {record['commit']}, "
        f"{record['machine']['cpu']} x {record['machine']['cpus']} ({record['machine']['slurm_node']}), "
        f"sweep command at nice {record['niced']} (the jobs run at slurmd's priority).",
        "",
        "| arm | launcher | SLURM jobs | wall s | one job per member / this | load before (1/5/15 min) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['arm']} | `{r['launcher']}` | {r['slurm_jobs']} | {r['wall_s']:.1f} | "
            f"{r['per_member_over_this'] or ''} | {' / '.join(map(str, r['load_before']))} |"
        )
    lines += ["", "Explained variance per member (0-5) in each arm:", ""]
    lines += [f"- {r['arm']}: {r['explained_variance']}" for r in results]
    (RESULTS / "slurm_grouped.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "slurm_grouped.md").read_text())


if __name__ == "__main__":
    main()
