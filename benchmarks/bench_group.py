"""Wall time of a 4-member sweep as one grouped job vs 4 separate live runs.

    python benchmarks/bench_group.py                       # 100k tokens per member
    python benchmarks/bench_group.py --tokens 25000 eval.rows=8

Runs `python -m saesweep.train --multirun sae.k=16,32,64,128 ...` (BatchTopK, d_sae 4608 = 8 x 576 by default,
batch 4096 tokens, live activations) twice, back to back: once on Hydra's basic launcher
(four separate runs, one after another, each loading the model and running the LM) and
once with hydra/launcher=grouped (one job, one LM pass, four SAEs). Writes
benchmarks/results/group_vs_separate.{json,md}. The acceptance bar is separate / grouped
wall time >= 2.5. (The committed result is from a run on a heavily shared machine whose
separate arm was stopped after 2 of its 4 members for a deadline; its files say so and
how the rest was extrapolated.)
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
MEMBERS = "sae.k=16,32,64,128"
# Evaluation is per member in both arms (nothing of it is shared by a group), and the
# default eval (256 rows, 64 CE rows of full LM passes) would take longer than training
# here; a small one keeps the comparison about training, as bench_cache.py does.
DEFAULT_EXTRA = ["eval.rows=13", "eval.ce_rows=3"]


def sweep(arm: str, tokens: int, extra: list[str], work: Path) -> dict:
    sweep_dir = work / f"sweep-{arm}"
    cmd = [
        sys.executable,
        "-m",
        "saesweep.train",
        "--multirun",
        MEMBERS,
        *(["hydra/launcher=grouped"] if arm == "grouped" else []),
        "architecture=batchtopk",
        "training.batch_size=4096",
        "activations.source=live",
        f"training.total_tokens={tokens}",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    (work / f"{arm}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{arm} sweep failed:\n{proc.stderr[-4000:]}")
    evals = [json.loads((sweep_dir / str(i) / "eval.json").read_text()) for i in range(4)]
    return {
        "arm": arm,
        "command": "python " + " ".join(cmd[1:]),
        "wall_seconds": round(wall, 1),
        "load_average_1min_before_after": [round(load_before, 2), round(load_after, 2)],
        "train_seconds": [round(e["train_seconds"], 1) for e in evals],
        "explained_variance": [round(e["explained_variance"], 4) for e in evals],
        "l0": [round(e["l0"], 2) for e in evals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens per member")
    parser.add_argument("extra", nargs="*", help=f"overrides for both arms (default: {' '.join(DEFAULT_EXTRA)})")
    args = parser.parse_args()
    extra = args.extra or DEFAULT_EXTRA

    import torch

    # Kept after the run (logs, run dirs) for a breakdown; delete it by hand.
    work = Path(tempfile.mkdtemp(prefix="bench-group-"))
    # Grouped first: if the machine gets quieter over time, that favours separate runs.
    grouped = sweep("grouped", args.tokens, extra, work)
    separate = sweep("separate", args.tokens, extra, work)
    ratio = separate["wall_seconds"] / grouped["wall_seconds"]
    result = {
        "tokens_per_member": args.tokens,
        "members": 4,
        "overrides": extra,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "work_dir": str(work),
        "note": "CPU shared with other jobs while measured (see load averages); arms ran back to back, grouped first",
        "grouped": grouped,
        "separate": separate,
        "separate_over_grouped_wall": round(ratio, 2),
        "meets_2_5x": ratio >= 2.5,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / "group_vs_separate"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    machine = result["machine"]
    lines = [
        f"# Sweep of 4 ({MEMBERS}), {args.tokens:,} tokens each: one grouped job vs 4 separate live runs",
        "",
        "| arm | wall s | train s per member | EV per member | L0 per member | load avg before/after |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['arm']} | {r['wall_seconds']} | {', '.join(map(str, r['train_seconds']))} | "
            f"{', '.join(map(str, r['explained_variance']))} | {', '.join(map(str, r['l0']))} | "
            f"{r['load_average_1min_before_after'][0]} / {r['load_average_1min_before_after'][1]} |"
            for r in (separate, grouped)
        ),
        "",
        f"separate / grouped wall time: **{ratio:.2f}x** (bar: >= 2.5x). Overrides for both: {' '.join(extra)}.",
        "",
        f"Grouped: `{grouped['command']}`",
        "",
        f"Separate: `{separate['command']}`",
        "",
        f"Machine: {machine['platform']}, {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']}; "
        f"{result['note']}.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
