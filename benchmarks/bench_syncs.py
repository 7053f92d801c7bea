#!/usr/bin/env python
"""Aten ops and GPU host syncs per steady training step, counted on a CPU.

Each architecture trains as `saesweep.training.member.Member` steps it, on synthetic
activations (no LM: its ops would drown the SAE's), alone and in a group of `--group`
members on the same batches (as `train_together` steps a grouped sweep: members that can
stack as one stacked model, saesweep.training.stacked; each with its own lr), under
saesweep.training.sync_counter.SyncCounter. Two sets of choices: the CPU's own, and a GPU's
forced on the CPU (`KERNELS.as_on("cuda")`: kernels and fixed-size selections). Steps are
counted apart on logging steps (every `--log-every`) and the others; a logging step's batched
read-back is not counted as a sync (it is the one it is allowed).

    python benchmarks/bench_syncs.py                     # writes benchmarks/results/syncs_cpu.{json,md}
    python benchmarks/bench_syncs.py --code /tmp/main --out benchmarks/results/syncs_cpu_before

`--code DIR` measures another checkout's saesweep (e.g. `git archive main`) with this
tree's counter; its members read metrics back one float() at a time, and those count. The
batched read-back of a logging step is not seen here (`.tolist()` of a CPU tensor runs no op).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# "topk+batchtopk": issue 17's group of 8, topk and batchtopk x 4 k, against one topk (and one batchtopk).
ARCHS = ["batchtopk", "topk", "topk+batchtopk", "matryoshka_batchtopk", "standard", "jumprelu", "gated"]


def load_counter():
    spec = importlib.util.spec_from_file_location("sync_counter", REPO / "saesweep/training/sync_counter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SyncCounter


def build_group(arch: str, n: int, args: argparse.Namespace, work: Path) -> list:
    import torch

    from saesweep.config.schema import TrainConfig
    from saesweep.sae import ARCHITECTURES
    from saesweep.training.member import Member

    members = []
    archs = arch.split("+")  # "topk+batchtopk": the grid, the first half of the group each
    for i in range(n):
        own = archs[i * len(archs) // n]
        cfg = TrainConfig()
        # The sweep: k = k/2, k, 2k, 4k, and each member its own lr.
        extra = {"k": args.k // 2 * 2 ** (i % 4), "dead_steps_threshold": 2} if "topk" in own else {}
        if own == "matryoshka_batchtopk":
            extra["matryoshka_widths"] = [args.d_sae // 8, args.d_sae // 2]
        cfg.sae = ARCHITECTURES[own].config_class(architecture=own, d_sae=args.d_sae, **extra)
        cfg.optimizer.lr = 4e-4 * (1 + i)  # members of a sweep differ in their own settings
        cfg.training.batch_size = args.batch
        cfg.training.total_tokens = args.batch * 10**6
        cfg.training.log_every = args.log_every
        run_dir = work / f"{arch}-{n}-{i}"
        run_dir.mkdir(parents=True)
        member = Member(i, cfg, run_dir, named=n > 1)
        torch.manual_seed(0)
        first = torch.randn(4 * args.batch, args.d_in)
        member.start(SimpleNamespace(d_in=args.d_in, d_out=args.d_in), torch.device("cpu"), 10**6, (first, first))
        members.append(member)
    return members


def count(arch: str, n: int, choices: str, args: argparse.Namespace, counter_class: type, work: Path) -> dict:
    import torch

    from saesweep.sae import sparse

    if choices == "cuda":
        as_on = getattr(sparse.KERNELS, "as_on", None)  # a checkout from before fixed-size selections has none
        sparse.KERNELS = as_on("cuda") if as_on else sparse.Kernels("dense", "sparse")
    else:
        sparse.KERNELS = sparse.Kernels()
    members = build_group(arch, n, args, work)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(args.batch, args.d_in, generator=g) for _ in range(args.steps + args.warmup)]
    steady: dict[str, list] = {"logging": [], "other": []}
    import saesweep.training.member as member_module

    read_back = getattr(member_module, "read_back", None)  # a checkpoint from before it reads in the step
    try:  # as train_together steps a group: stacks where members can stack (a checkout from before: alone)
        from saesweep.training.stacked import Steppers

        steppers = Steppers().covering
    except ImportError:
        steppers = list
    for i, x in enumerate(data):
        counter = counter_class()
        with counter:
            for member in steppers(members):
                if read_back:
                    member.train_step(x, x)
                else:
                    member.train_step(x, x, lambda: 1.0)
            if read_back:
                read_back(members, lambda: 1.0)
        failed = [m.error for m in members if m.error is not None]
        if failed:
            raise SystemExit(f"{arch}: {failed[0]!r}")
        if i >= args.warmup:
            kind = "logging" if members[0].step % args.log_every == 0 else "other"
            steady[kind].append((counter.ops, sum(counter.syncs.values()), dict(counter.syncs)))
    out = {}
    for kind, rows in steady.items():
        if rows:
            out[kind] = {
                "steps": len(rows),
                "ops_per_step": sum(r[0] for r in rows) / len(rows),
                "syncs_per_step": sum(r[1] for r in rows) / len(rows),
                "sync_ops": {k: sum(r[2].get(k, 0) for r in rows) / len(rows) for k in {k for r in rows for k in r[2]}},
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, help="measure the saesweep of this checkout instead")
    parser.add_argument("--code-commit", help="the commit --code is a copy of (a `git archive` has no .git)")
    parser.add_argument("--out", type=Path, default=RESULTS / "syncs_cpu", help="results path, without suffix")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    counter_class = load_counter()
    sys.path.insert(0, str(args.code or REPO))
    import torch

    import saesweep

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            for choices in ("cpu", "cuda"):
                for n in (1, args.group):
                    counts = count(arch, n, choices, args, counter_class, Path(tmp) / f"{choices}")
                    rows.append({"arch": arch, "choices": choices, "members": n, **counts})
                    print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(
        ["git", "-C", str(args.code or REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code": str(Path(saesweep.__file__).parent),
        "commit": args.code_commit or commit.stdout.strip() or None,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Ops and GPU host syncs per steady step, counted on a CPU ({result['date']})",
        "",
        f"Code: `{result['code']}` ({result['commit']}); torch {result['torch']}; d_in {args.d_in}, "
        f"d_sae {args.d_sae}, k {args.k} (TopK family: member i has k/2 x 2^(i mod 4)), batch {args.batch}; "
        f"{args.steps} steps after {args.warmup}, "
        f"logging every {args.log_every}. Load: `{result['uptime']}`.",
        "",
        "Syncs are the ops of saesweep/training/sync_counter.py. `cuda`: a GPU's choices forced on the",
        "CPU (`KERNELS.as_on('cuda')`). A logging step's one batched read-back (`.tolist()` of a CPU",
        "tensor) runs no aten op here and is not in its counts; a checkout from before it read its",
        "metrics with one `float()` each, and those are.",
        "",
        "A group steps as `train_together` steps it: members that can stack (one class and shape, or",
        "TopK with BatchTopK) as one stacked model (saesweep.training.stacked), the others alone.",
        "`topk+batchtopk`: the issue's group of 8, TopK and BatchTopK x 4 k; its group of 1 is one",
        "TopK member. `x1`: ops per steady step against the group of 1 of the same row pair (for",
        "`topk+batchtopk` also against one BatchTopK member, the default run the issue counted).",
        "",
        "| architecture | choices | members | ops/step | x1 | syncs/step | logging: ops/step | logging: syncs/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ones = {(r["arch"], r["choices"]): r.get("other", {}).get("ops_per_step") for r in rows if r["members"] == 1}
    for r in rows:
        o, lg = r.get("other", {}), r.get("logging", {})
        ops = o.get("ops_per_step", 0)
        ratio = f"{ops / ones[r['arch'], r['choices']]:.2f}x"
        if r["arch"] == "topk+batchtopk" and r["members"] > 1:
            ratio += f" ({ops / ones['batchtopk', r['choices']]:.2f}x one BatchTopK)"
        lines.append(
            f"| {r['arch']} | {r['choices']} | {r['members']} | {ops:.1f} | {ratio} | "
            f"{o.get('syncs_per_step', 0):.2f} | {lg.get('ops_per_step', 0):.1f} | {lg.get('syncs_per_step', 0):.2f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
