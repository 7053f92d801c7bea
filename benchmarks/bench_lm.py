#!/usr/bin/env python
"""The live-training ceiling: tokens/s of the LM forward to the hook, nothing else.

Runs exactly what training's live feed runs per buffer refill (`ActivationSource.batches`
over the training rows: the LM stopped after the hook's layer, BOS positions dropped),
for `--tokens` tokens after one warm-up batch, and prints one JSON line. End-to-end
training can approach this number but not pass it.

    python benchmarks/bench_lm.py                                   # embedded SmolLM2, TL, CPU
    python benchmarks/bench_lm.py --backend hf --hook model.layers.6 --model-dir DIR \\
        --device cuda --batch-rows 256 --autocast bf16 --tokens 2000000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model-dir",
        default=None,
        help="an HF checkpoint dir (model.source=pretrained); default: the embedded SmolLM2",
    )
    p.add_argument("--backend", default="transformer_lens", choices=["transformer_lens", "hf"])
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-rows", type=int, default=32, help="rows of 128 tokens per forward")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--autocast", default="none", choices=["none", "bf16"])
    p.add_argument(
        "--allocator",
        default="kept",
        choices=["kept", "glibc"],
        help="kept: freed memory stays in the process, as in training (saesweep/allocator.py); glibc: its defaults",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()

    from saesweep.activations.source import ActivationSource
    from saesweep.config.schema import DatasetConfig, ModelConfig
    from saesweep.data.rows import load_token_rows
    from saesweep.lm.model import load_model
    from saesweep.training.allocator import keep_freed_memory

    kept = args.allocator == "kept" and keep_freed_memory()
    device = torch.device(args.device)
    model_cfg = ModelConfig(backend=args.backend, hook_point=args.hook)
    if args.model_dir:
        model_cfg.source, model_cfg.name = "pretrained", args.model_dir
    model = load_model(model_cfg, device, None)
    rows = load_token_rows(DatasetConfig(), model.tokenizer, eval_rows=8, seed=0)
    source = ActivationSource(model, args.hook, None, exclude_bos=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")

    with torch.no_grad(), amp:
        chunks = source.batches(rows.train_iter(), args.batch_rows)
        next(chunks)  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, seen = time.perf_counter(), 0
        while seen < args.tokens:
            (x,) = next(chunks)
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start

    result = {
        "benchmark": "lm_forward_to_hook",
        "backend": args.backend,
        "hook": args.hook,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "model": args.model_dir or model_cfg.name,
        "batch_rows": args.batch_rows,
        "autocast": args.autocast,
        "allocator": "kept" if kept else "glibc",
        "tokens": seen,
        "seconds": seconds,
        "tokens_per_second": seen / seconds,
        "torch": torch.__version__,
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
