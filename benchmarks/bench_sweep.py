#!/usr/bin/env python
"""Wall time of a 4-member k sweep (sae.k=16,32,64,128), live activations: saesweep
grouped vs saesweep separate vs 4 separate sparsify runs vs 4 separate SAELens runs.

Part (c) of the benchmark suite. Same model, hook, data, 4,608 latents, 4,096 tokens per
step and tokens per member in every arm (see bench_e2e.py for the per-arm settings):

  saesweep_grouped        one `python -m saesweep.train --multirun hydra/launcher=grouped
                          sae.k=16,32,64,128 ...` command: one process, one model load,
                          one LM pass feeding four BatchTopK SAEs, four small evaluations.
  saesweep_grouped_cache  the same with activations.source=cache on a fresh cache dir (so
                          it pays for the build); only with --with-cache.
  saesweep_separate       the same multirun on Hydra's basic launcher: four runs one after
                          another, each loading the model and running the LM itself (in one
                          process, so they share Python start-up and evaluation's
                          SAE-independent parts).
  saesweep_processes      four `python -m saesweep.train sae.k=K ...` processes, one per k:
                          four separate jobs, as a user or a SLURM array runs them.
  sparsify_separate       four processes of sparsify's Trainer (TopK; bench_e2e.py's
                          sparsify worker), one per k: sparsify trains several SAEs in one
                          pass only over hookpoints or seeds, not over k.
  saelens_separate        four processes of SAELens's BatchTopK runner (bench_e2e.py's
                          worker, i.e. bench_vs_saelens.run_saelens), one per k.

Wall = whole-process wall clock, summed over an arm's processes (model loads included,
as a user waits for them). Each arm also reports its training time alone (saesweep:
eval.json train_seconds, the group's shared span counted once; sparsify: fit(); SAELens:
runner.run()). --peer-members / --separate-members measure fewer than 4 members of the
separate arms and extrapolate linearly (wall x 4 / measured); the files say when.

    python benchmarks/bench_sweep.py --tokens 49152
    python benchmarks/bench_sweep.py --tokens 8192 --out /tmp/sweep_smoke.json   # smoke test

Writes benchmarks/results/sweep_cpu.{json,md} (the JSON after every arm).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as e2e  # noqa: E402

MEMBERS = [16, 32, 64, 128]


def saesweep_sweep(arm: str, tokens: int, ks: list[int], work: Path) -> dict[str, Any]:
    sweep_dir = work / arm
    launcher = ["hydra/launcher=grouped"] if arm.startswith("saesweep_grouped") else []
    cache = ["activations.source=cache", f"activations.cache_dir={work / 'acts'}"] if arm.endswith("cache") else []
    common = [c for c in e2e.COMMON if not (cache and c.startswith("activations.source"))]
    cmd = [
        e2e.PY,
        "-m",
        "saesweep.train",
        "--multirun",
        f"sae.k={','.join(map(str, ks))}",
        *launcher,
        "architecture=batchtopk",
        *common,
        *cache,
        f"training.total_tokens={tokens}",
        *e2e.EVAL,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    before = e2e.loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=e2e.REPO, env={**__import__("os").environ, "PYTHONPATH": str(e2e.REPO)}, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    (work / f"{arm}.log").write_text(proc.stdout + proc.stderr)
    rec: dict[str, Any] = {
        "arm": arm,
        "commands": [" ".join(c.replace(e2e.PY, "python") for c in cmd)],
        "members_measured": ks,
        "measured_wall_seconds": round(wall, 1),
        "load_1min_before_after": [[before, e2e.loadavg()]],
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        rec["error"] = proc.stderr[-2000:]
        return rec
    evals = [json.loads((sweep_dir / str(i) / "eval.json").read_text()) for i in range(len(ks))]
    train = [e["train_seconds"] for e in evals]
    rec.update(
        train_seconds_per_member=[round(t, 1) for t in train],
        # A group trains its members in one shared span: count it once.
        measured_train_seconds=round(max(train) if launcher else sum(train), 1),
        tokens_per_member=[e["tokens_trained"] for e in evals],
        l0=[round(e["l0"], 2) for e in evals],
        explained_variance=[round(e["explained_variance"], 4) for e in evals],
    )
    return rec


def process_sweep(arm: str, run: str, tokens: int, ks: list[int], work: Path) -> dict[str, Any]:
    """One process per member: bench_e2e's arm `run` with each k."""
    runs = [e2e.run_arm(run, tokens, 0, work, f"k{k}", k=k) for k in ks]
    rec: dict[str, Any] = {
        "arm": arm,
        "commands": [r["command"] for r in runs],
        "members_measured": ks,
        "measured_wall_seconds": round(sum(r["process_seconds"] for r in runs), 1),
        "process_seconds_per_member": [r["process_seconds"] for r in runs],
        "load_1min_before_after": [r["load_1min_before_after"] for r in runs],
        "returncode": max(r["returncode"] for r in runs),
    }
    if rec["returncode"] != 0:
        rec["error"] = next(r["error"] for r in runs if "error" in r)
        return rec
    rec.update(
        train_seconds_per_member=[round(r["seconds"], 1) for r in runs],
        measured_train_seconds=round(sum(r["seconds"] for r in runs), 1),
        tokens_per_member=[r["tokens"] for r in runs],
    )
    if "load_seconds" in runs[0]:
        rec["load_seconds_per_member"] = [round(r["load_seconds"], 1) for r in runs]
    if "l0" in runs[0]:
        rec["l0"] = [round(r["l0"], 2) for r in runs]
        rec["explained_variance"] = [round(r["explained_variance"], 4) for r in runs]
    return rec


def finish(rec: dict[str, Any]) -> dict[str, Any]:
    """Whole-sweep figures: measured, or extrapolated to 4 members when fewer ran."""
    n = len(rec["members_measured"])
    scale = len(MEMBERS) / n if not rec["arm"].startswith("saesweep_grouped") else 1.0
    rec["extrapolated"] = scale != 1.0
    rec["sweep_wall_seconds"] = round(rec["measured_wall_seconds"] * scale, 1)
    if "measured_train_seconds" in rec:
        rec["sweep_train_seconds"] = round(rec["measured_train_seconds"] * scale, 1)
    return rec


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = [
        f"# Sweep of 4 (sae.k=16,32,64,128), {s['tokens']:,} tokens requested per member, live activations, CPU",
        "",
        f"Generated by `benchmarks/bench_sweep.py` ({res['finished'] or 'INCOMPLETE, stopped at ' + res['updated']}). "
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores shared with other jobs, torch {m['torch']}, "
        f"sae-lens {m['sae_lens']}, eai-sparsify {m['eai_sparsify']}. saesweep arms: BatchTopK, TransformerLens "
        f"backend fp32 (the defaults), {' '.join(e2e.EVAL)}; sparsify: TopK, its defaults, LM truncated after "
        f"layer 6; SAELens: BatchTopK as in bench_vs_saelens.py. Arms ran one after another in the order listed "
        f"in the JSON.",
        "",
        "| arm | sweep wall s | members measured | wall s per member (process) | training s (see below) | "
        "EV per member | L0 per member | load avg before/after |",
        "|---|---:|---|---|---:|---|---|---|",
    ]
    for r in res["arms"]:
        if "error" in r:
            lines.append(f"| {r['arm']} | FAILED (rc {r['returncode']}) | | | | | | |")
            continue
        per = r.get("process_seconds_per_member") or ["one process"]
        loads = "; ".join(f"{a}/{b}" for a, b in r["load_1min_before_after"])
        ex = " (extrapolated)" if r["extrapolated"] else ""
        lines.append(
            f"| {r['arm']} | **{r['sweep_wall_seconds']}**{ex} | {','.join(map(str, r['members_measured']))} | "
            f"{', '.join(map(str, per))} | {r.get('sweep_train_seconds', '-')}{ex} | "
            f"{', '.join(map(str, r.get('explained_variance', ['-'])))} | {', '.join(map(str, r.get('l0', ['-'])))} | {loads} |"
        )
    lines += ["", "Ratios of sweep wall time (slower arm / saesweep_grouped):", ""]
    for k, v in res["ratios"].items():
        lines.append(f"- {k}: {v:.2f}x")
    lines.append("")
    for baseline, what in (
        ("saesweep_processes", "4 separate processes (jobs)"),
        ("saesweep_separate", "4 runs of one basic-launcher multirun"),
    ):
        bar = res["ratios"].get(f"{baseline}_over_saesweep_grouped")
        if bar is not None:
            lines.append(
                f"Acceptance bar: grouped >= 2.5x faster than {what}: "
                f"**{'met' if bar >= 2.5 else 'NOT met'}** ({bar:.2f}x)."
            )
    lines += [
        "",
        "What the times include: *sweep wall* = whole-process wall clock summed over the arm's processes "
        "(Python start, imports, model load, training, saesweep's small per-member evaluation, saving). "
        "*training s* = saesweep: eval.json `train_seconds` (the grouped job's shared span counted once, separate "
        "runs summed); sparsify: its `Trainer.fit()` summed; SAELens: its `runner.run()` summed (norm-estimate "
        "batches included). The SAELens worker also evaluates each saved SAE on 16 held-out rows (not part of "
        "SAELens; inside its process wall, outside its training s); sparsify does no evaluation.",
        "",
        "Exact commands: `arms[].commands` in the JSON.",
    ]
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], out: Path) -> None:
    by = {r["arm"]: r for r in res["arms"] if "sweep_wall_seconds" in r}
    ratios = {}
    if "saesweep_grouped" in by:
        g = by["saesweep_grouped"]["sweep_wall_seconds"]
        for a, r in by.items():
            if a != "saesweep_grouped":
                ratios[f"{a}_over_saesweep_grouped"] = r["sweep_wall_seconds"] / g
    res["ratios"] = ratios
    e2e.save(res, out, markdown)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=49_152, help="training tokens per member")
    p.add_argument(
        "--arms", default="saesweep_grouped,saesweep_separate,saesweep_processes,sparsify_separate,saelens_separate"
    )
    p.add_argument("--with-cache", action="store_true", help="also run saesweep_grouped_cache")
    p.add_argument(
        "--separate-members", default="16,32,64,128", help="k values the saesweep_separate and _processes arms run"
    )
    p.add_argument("--peer-members", default="16,32,64,128", help="k values the sparsify/SAELens arms run")
    p.add_argument("--out", type=Path, default=e2e.RESULTS / "sweep_cpu.json")
    p.add_argument("--note", default="")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.report_only:
        res = json.loads(args.out.read_text())
        res["note"] = args.note or res.get("note", "")
        write(res, args.out)
        print(args.out.with_suffix(".md").read_text())
        return

    arms = args.arms.split(",")
    if args.with_cache:
        arms.insert(1, "saesweep_grouped_cache")
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    sep = [int(k) for k in args.separate_members.split(",")]
    peers = [int(k) for k in args.peer_members.split(",")]
    res: dict[str, Any] = {
        "benchmark": "k_sweep_wall_time",
        "machine": e2e.machine_info(),
        "work_dir": str(work),
        "settings": {
            "tokens": args.tokens,
            "members": MEMBERS,
            "separate_members": sep,
            "peer_members": peers,
            "saesweep_eval": e2e.EVAL,
            "common_overrides": e2e.COMMON,
        },
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "note": args.note,
        "arms": [],
    }
    for arm in arms:
        if arm == "saesweep_processes":
            rec = process_sweep(arm, "saesweep_batchtopk_tl_fp32", args.tokens, sep, work)
        elif arm.startswith("saesweep"):
            rec = saesweep_sweep(arm, args.tokens, MEMBERS if arm.startswith("saesweep_grouped") else sep, work)
        else:
            rec = process_sweep(arm, arm.removesuffix("_separate"), args.tokens, peers, work)
        if "error" not in rec:
            finish(rec)
        else:
            print(rec["error"], file=sys.stderr, flush=True)
        print(
            json.dumps({k: rec.get(k) for k in ("arm", "sweep_wall_seconds", "measured_wall_seconds", "returncode")}),
            flush=True,
        )
        res["arms"].append(rec)
        write(res, args.out)
    res["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write(res, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
