#!/usr/bin/env python
"""Evaluation's decoder on a CPU: dense product vs CSR sparse product, by code density.

Sets SPARSE_DECODE_DENSITY in saesweep/sae/base.py. 16,384 tokens of codes over 4,608
latents (the embedded default's d_sae) decoded to 576 dims, median of 5 each:

    python benchmarks/bench_sparse_decode.py    # writes benchmarks/results/sparse_decode_cpu.{json,md}
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    n, d_sae, d = 16_384, 4_608, 576
    w, b = torch.randn(d_sae, d), torch.randn(d)
    rows = []
    for l0 in (16, 32, 128, 256, 512, 1024):
        codes = torch.zeros(n, d_sae)
        idx = torch.rand(n, d_sae).argsort(-1)[:, :l0]
        codes.scatter_(1, idx, torch.rand(n, l0))
        dense = timed(lambda: torch.addmm(b, codes, w))
        sparse = timed(lambda: torch.addmm(b, codes.to_sparse_csr(), w))  # conversion included
        assert torch.allclose(torch.addmm(b, codes, w), torch.addmm(b, codes.to_sparse_csr(), w), atol=1e-3)
        rows.append(
            {
                "l0": l0,
                "density": l0 / d_sae,
                "dense_ms": round(dense * 1e3, 1),
                "sparse_ms": round(sparse * 1e3, 1),
                "dense_over_sparse": round(dense / sparse, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": n, "d_sae": d_sae, "d": d}
    (RESULTS / "sparse_decode_cpu.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Decoder at evaluation, CPU: dense vs CSR sparse ({n:,} tokens, {d_sae} latents -> {d})",
        "",
        f"`python benchmarks/bench_sparse_decode.py`, torch {meta['torch']}, {meta['threads']} threads, "
        "median of 5; the sparse time includes the conversion to CSR.",
        "",
        "| L0 | density | dense ms | sparse ms | dense / sparse |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {r['l0']} | {r['density']:.3f} | {r['dense_ms']} | {r['sparse_ms']} | {r['dense_over_sparse']}x |"
            for r in rows
        ),
    ]
    (RESULTS / "sparse_decode_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
