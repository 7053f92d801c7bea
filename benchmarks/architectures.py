"""Every architecture at its defaults on the embedded default setup: one table.

Runs the architectures as one saesweep multirun (so the table is the sweep report),
then copies the report into benchmarks/results/ with the machine it ran on:

    python benchmarks/architectures.py                      # all, 1M tokens each (~12 min each on 2 CPU cores)
    python benchmarks/architectures.py --archs topk,gated --tokens 200000

Finished members are not trained again (their run dirs hold eval.json), so an
interrupted run continues where it stopped when given the same --sweep-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ALL = "standard,gated,jumprelu,topk,batchtopk,matryoshka_batchtopk"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=ALL, help=f"comma list (default {ALL})")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--sweep-dir", type=Path, default=REPO / "multirun" / "architectures")
    parser.add_argument("--name", default="architectures", help="results file stem")
    args, overrides = parser.parse_known_args()

    cmd = [
        sys.executable,
        "-m",
        "saesweep.train",
        "--multirun",
        f"architecture={args.archs}",
        f"training.total_tokens={args.tokens}",
        f"hydra.sweep.dir={args.sweep_dir}",
        *overrides,
    ]
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=REPO).returncode

    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": cmd, "machine": machine}, indent=2) + "\n")
    shutil.copy(args.sweep_dir / "report.csv", RESULTS / f"{args.name}.csv")
    report = (args.sweep_dir / "report.md").read_text().replace("](pareto.png)", f"]({args.name}.png)")
    header = (
        f"Command: `{' '.join(['python benchmarks/architectures.py', *sys.argv[1:]])}`  \n"
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}"
        f"{', GPU ' + machine['gpu'] if machine['gpu'] else ', no GPU'}\n\n"
    )
    (RESULTS / f"{args.name}.md").write_text(header + report)
    shutil.copy(args.sweep_dir / "pareto.png", RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.md")
    return code


if __name__ == "__main__":
    sys.exit(main())
