#!/usr/bin/env python
"""A group's SAE steps, stacked (saesweep.training.stacked) against member by member.

The same members (one architecture, each its own lr), on the same synthetic activations in
memory (no LM), step in one process two ways, interleaved step by step so that drift in a
shared machine's load hits both alike: each member's own `Member.train_step`, as before
stacks, and the stacks `train_together` forms. The allocator is set as training sets it
(saesweep.training.allocator). On a CPU the step's arithmetic dominates, so the two should
tie; the stack's gain is in host dispatch (benchmarks/results/syncs_cpu.md), which is what
a GPU's step waits on.

    python benchmarks/bench_stack.py                    # writes benchmarks/results/stack_cpu.{json,md}
    python benchmarks/bench_stack.py --device cuda --out benchmarks/results/stack_cuda
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from saesweep.config.schema import TrainConfig  # noqa: E402
from saesweep.sae import ARCHITECTURES  # noqa: E402
from saesweep.training.allocator import keep_freed_memory  # noqa: E402
from saesweep.training.member import Member, read_back  # noqa: E402
from saesweep.training.stacked import Steppers  # noqa: E402


def members(arch: str, n: int, args: argparse.Namespace, work: Path, device: torch.device) -> list[Member]:
    out = []
    for i in range(n):
        cfg = TrainConfig()
        cfg.sae = ARCHITECTURES[arch].config_class(architecture=arch, d_sae=args.d_sae, k=args.k)
        cfg.optimizer.lr = 1e-4 * (i + 1)
        cfg.training.batch_size = args.batch
        cfg.training.total_tokens = args.batch * 10**6
        cfg.training.log_every = 10**6  # steady steps only
        cfg.training.device = str(device)
        (work / str(i)).mkdir(parents=True)
        member = Member(i, cfg, work / str(i), named=True)
        first = torch.randn(2 * args.batch, args.d_in, generator=torch.Generator().manual_seed(0)).to(device)
        member.start(SimpleNamespace(d_in=args.d_in, d_out=args.d_in), device, 10**6, (first, first))
        out.append(member)
    return out


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", default="batchtopk,topk")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stack_cpu")
    args = parser.parse_args()
    keep_freed_memory()
    device = torch.device(args.device)
    rows = []
    for arch in args.archs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            alone = members(arch, args.members, args, Path(tmp) / "alone", device)
            group = members(arch, args.members, args, Path(tmp) / "stack", device)
            steppers = Steppers()
            g = torch.Generator().manual_seed(1)
            times: dict[str, list[float]] = {"alone": [], "stack": []}
            for i in range(args.warmup + args.steps):
                x = torch.randn(args.batch, args.d_in, generator=g).to(device)

                def one_by_one() -> None:
                    for m in alone:
                        m.train_step(x, x)
                    read_back(alone, lambda: 1.0)

                def stacked() -> None:
                    for s in steppers.covering(group):
                        s.train_step(x, x)
                    read_back(group, lambda: 1.0)

                for name, step in (("alone", one_by_one), ("stack", stacked)):
                    seconds = timed(step, device)
                    if i >= args.warmup:
                        times[name].append(seconds)
            assert all(m.error is None for m in alone + group)
            row = {
                "arch": arch,
                "members": args.members,
                **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
            }
            row["alone_over_stack"] = row["alone_median_s"] / row["stack_median_s"]
            row["per_step_s"] = times
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_step_s"}), flush=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# A group's SAE steps: stacked against member by member ({result['date']})",
        "",
        f"`benchmarks/bench_stack.py` at {result['commit']}; torch {result['torch']}, device {args.device}, "
        f"{result['threads']} threads; {args.members} members (each its own lr), d_in {args.d_in}, d_sae "
        f"{args.d_sae}, k {args.k}, {args.batch} tokens per step, synthetic activations in memory; "
        f"{args.steps} steps after {args.warmup}, the two ways interleaved. Load: `{result['uptime']}`.",
        "",
        "| architecture | members | member by member, s/step | stacked, s/step | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['members']} | {r['alone_median_s']:.3f} | {r['stack_median_s']:.3f} | "
            f"{r['alone_over_stack']:.2f}x |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
