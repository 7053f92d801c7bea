"""Wall time of a 4-member sweep with the shared activation cache vs live LM passes.

    python benchmarks/bench_cache.py --tokens 100000            # scaled-down acceptance
    python benchmarks/bench_cache.py --tokens 1000000           # the acceptance test itself

Runs `python -m saesweep.train --multirun activations.source=S sae.k=16,32,64,128` once
with S=live and once with S=cache (a fresh, empty cache dir, so the cache arm pays for
its build), each as one command on Hydra's basic launcher (members one after another),
and writes benchmarks/results/cache_vs_live_<tokens>.{json,md}. The acceptance bar is
cache wall time <= 45 % of live wall time with the LM run once ("cache built" once,
"cache hit" three times).

With --with-grouped a third arm runs the same live sweep as one grouped job
(`hydra/launcher=grouped`: one process, one LM pass feeding all four SAEs); its bar
(issue 7) is 4 separate live runs >= 2.5x its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def sweep(source: str, tokens: int, extra: list[str], work: Path, grouped: bool = False) -> dict:
    sweep_dir = work / f"sweep-{source}{'-grouped' if grouped else ''}"
    cmd = [
        sys.executable,
        "-m",
        "saesweep.train",
        "--multirun",
        *(["hydra/launcher=grouped"] if grouped else []),
        f"activations.source={source}",
        "sae.k=16,32,64,128",
        f"training.total_tokens={tokens}",
        f"activations.cache_dir={work / 'acts'}",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        sys.exit(f"{source} sweep failed:\n{proc.stderr[-4000:]}")
    log = proc.stdout + proc.stderr
    evals = [json.loads((sweep_dir / str(i) / "eval.json").read_text()) for i in range(4)]
    return {
        "source": source + (" (grouped)" if grouped else ""),
        "command": " ".join(cmd[1:]),
        "wall_seconds": round(wall, 1),
        "load_average_1min_before_after": [round(load_before, 2), round(load_after, 2)],
        "cache_built": len(re.findall(r"cache built", log)),
        "cache_hit": len(re.findall(r"cache hit", log)),
        "train_seconds": [round(e["train_seconds"], 1) for e in evals],
        "explained_variance": [round(e["explained_variance"], 4) for e in evals],
        "l0": [round(e["l0"], 2) for e in evals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--with-grouped", action="store_true", help="also run the live sweep as one grouped job")
    parser.add_argument("--note", default="CPU shared with other jobs while measured (see load averages)")
    parser.add_argument("extra", nargs="*", help="more overrides for both arms (e.g. eval.ce_rows=8)")
    args = parser.parse_args()

    # Kept after the run (logs, run dirs, the cache) for a breakdown; delete it by hand.
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    # Cache first: if the machine gets quieter over time, that favours live (conservative).
    cache = sweep("cache", args.tokens, args.extra, work)
    (manifest,) = (work / "acts").glob("*/manifest.json")
    cache["cache_build_seconds"] = json.loads(manifest.read_text())["build_seconds"]
    live = sweep("live", args.tokens, args.extra, work)
    grouped = sweep("live", args.tokens, args.extra, work, grouped=True) if args.with_grouped else None
    ratio = cache["wall_seconds"] / live["wall_seconds"]
    result = {
        "tokens_per_run": args.tokens,
        "runs": 4,
        "extra_overrides": args.extra,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "work_dir": str(work),
        "note": f"{args.note}; arms ran back to back, cache first, then live{', then grouped' if grouped else ''}",
        "live": live,
        "cache": cache,
        **(
            {"grouped": grouped, "live_over_grouped_wall": round(live["wall_seconds"] / grouped["wall_seconds"], 3)}
            if grouped
            else {}
        ),
        "cache_over_live_wall": round(ratio, 3),
        "meets_45_percent": ratio <= 0.45 and cache["cache_built"] == 1 and cache["cache_hit"] == 3,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"cache_vs_live_{args.tokens}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Sweep of 4 (sae.k=16,32,64,128), {args.tokens:,} tokens each: cache vs live",
        "",
        "| source | wall s | cache built | cache hit | train s per member | EV per member | load avg before/after |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['source']} | {r['wall_seconds']} | {r['cache_built']} | {r['cache_hit']} | "
            f"{', '.join(map(str, r['train_seconds']))} | {', '.join(map(str, r['explained_variance']))} | "
            f"{r['load_average_1min_before_after'][0]} / {r['load_average_1min_before_after'][1]} |"
            for r in (live, cache, *([grouped] if grouped else []))
        ),
        "",
        f"cache / live wall time: **{ratio:.1%}** (bar: <= 45 %). Overrides: {' '.join(args.extra) or 'none'}.",
        *(
            [
                f"4 separate live runs / one grouped live job: **{result['live_over_grouped_wall']:.2f}x** (bar: >= 2.5x)."
            ]
            if grouped
            else []
        ),
        f"The cache arm's LM pass (build) took {cache['cache_build_seconds']} s of its {cache['wall_seconds']} s.",
        f"Machine: {result['machine']}; {result['note']}.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
