#!/usr/bin/env python
"""End to end from tokens: saesweep vs EleutherAI sparsify vs SAELens, live activations.

Part (b) of the benchmark suite. Every arm trains on the embedded default (SmolLM2-135M,
layer 6 residual = TL `blocks.6.hook_resid_post` = HF `model.layers.6`; Shakespeare rows
of 128, BOS excluded; k=32, 4,608 latents; 4,096 tokens per step) with the LM run live,
and each arm is a separate process, so none inherits another's warm caches:

  saesweep_*   `python -m saesweep.train ...` exactly as a user runs it (small eval);
               tokens/s = eval.json's tokens_per_second (its train_seconds span: from
               just before the first buffer fill to the last optimizer step; no model
               load, no evaluation, no export).
  sparsify     EleutherAI sparsify's own `Trainer(cfg, dataset, model).fit()` on the
               converted HF checkpoint of the same model, the same training rows (our
               shuffled first-epoch order), TopK k=32, 4,608 latents, 32 rows of 128 per
               step, BOS excluded (`exclude_tokens`), its defaults otherwise (signum +
               schedule-free, FVU loss). Its LM is truncated after layer 6 (layers[:7],
               final norm and lm_head replaced by Identity), since sparsify runs the whole
               model by default. tokens/s = non-BOS tokens / seconds of fit() (which
               includes its final save; model load and Trainer construction excluded).
  saelens      bench_vs_saelens.run_saelens (imported, unchanged): SAELens's BatchTopK
               runner on saesweep's TransformerLens model object. tokens/s = tokens /
               seconds of runner.run() (its norm-estimate batches, whose first call also
               fills its buffer, the loop, folding, saving); also reported without the
               norm estimate, which flatters SAELens (its first buffer fill is dropped).
  ceiling_*    bench_lm.py: the LM forward to the hook alone, per backend: no arm can
               pass it.

Repeats are interleaved (all arms, then all arms again in reverse order) so drift in a
shared machine's load hits every arm alike; the tables show medians.

    python benchmarks/bench_e2e.py --tokens 98304 --repeats 2
    python benchmarks/bench_e2e.py --tokens 8192 --repeats 1 --out /tmp/e2e_smoke.json   # smoke test

Writes benchmarks/results/e2e_cpu.json (after every run, so a partial run keeps what it
measured) and e2e_cpu.md. `--report-only` rewrites the markdown from the JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(REPO))
from saesweep.training.allocator import THRESHOLD, USER_SETTINGS  # noqa: E402  (light: ctypes and os only)

RESULTS = BENCH / "results"
PY = sys.executable

# Small evaluation: the arms are compared on training speed; saesweep's figure excludes
# evaluation anyway, this only keeps each process short.
EVAL = ["eval.rows=16", "eval.ce_rows=2"]
COMMON = ["training.batch_size=4096", "sae.expansion_factor=8", "activations.source=live", "training.device=cpu"]

# name -> saesweep overrides (on top of COMMON, the token count, the k and EVAL)
SAESWEEP_ARMS = {
    "saesweep_batchtopk_tl_fp32": ["architecture=batchtopk"],
    "saesweep_batchtopk_hf_fp32": ["architecture=batchtopk", "model=smollm2-135m-hf"],
    "saesweep_batchtopk_tl_bf16": ["architecture=batchtopk", "training.autocast=bf16"],
    "saesweep_batchtopk_hf_bf16": ["architecture=batchtopk", "model=smollm2-135m-hf", "training.autocast=bf16"],
    "saesweep_topk_hf_bf16": ["architecture=topk", "model=smollm2-135m-hf", "training.autocast=bf16"],
}
CEILING_ARMS = {
    "ceiling_tl_fp32": ["--backend", "transformer_lens", "--hook", "blocks.6.hook_resid_post"],
    "ceiling_tl_fp32_glibc": [
        "--backend",
        "transformer_lens",
        "--hook",
        "blocks.6.hook_resid_post",
        "--allocator",
        "glibc",
    ],
    "ceiling_hf_fp32": ["--backend", "hf", "--hook", "model.layers.6"],
    "ceiling_hf_bf16": ["--backend", "hf", "--hook", "model.layers.6", "--autocast", "bf16"],
}
PEER_ARMS = ("sparsify", "sparsify_kept_memory", "saelens")
# Peer arms run as another arm's worker under extra environment variables: sparsify with
# glibc keeping freed memory as saesweep's training does (saesweep/allocator.py), set the
# only way a sparsify user could, at process start.
PEER_VARIANTS = {"sparsify_kept_memory": ("sparsify", {name: str(THRESHOLD) for name in USER_SETTINGS})}


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    cpu = platform.processor() or "unknown"
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sae_lens": version("sae-lens"),
        "eai_sparsify": version("eai-sparsify"),
        "transformers": version("transformers"),
        "transformer_lens": version("transformer-lens"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --- workers: one arm in this process (run as a subprocess by the drivers) ------------


def compose(overrides: list[str]) -> Any:
    """saesweep's typed config, as `python -m saesweep.train OVERRIDES` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from saesweep.config.schema import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return validate(hydra_compose(config_name="train", overrides=overrides))


def worker_sparsify(tokens: int, k: int, work: Path) -> dict[str, Any]:
    """sparsify's Trainer.fit() on the same model, rows and sizes; see the module docstring."""
    import datasets
    import torch
    from sparsify import SaeConfig, TrainConfig, Trainer
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saesweep.data.rows import load_token_rows
    from saesweep.lm.model import embedded_model_dir
    from saesweep.lm.shape import hook_layer

    t_load = time.perf_counter()
    cfg = compose(["model=smollm2-135m-hf", f"sae.k={k}", *COMMON])
    model_dir = embedded_model_dir(cfg.model.name, cfg.cache_dir)  # the converted safetensors dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    layer = hook_layer(cfg.model.hook_point)  # model.layers.6 -> 6
    # Truncate after the hooked layer: sparsify runs the whole model otherwise.
    model.model.layers = model.model.layers[: layer + 1]
    model.config.num_hidden_layers = layer + 1
    model.config.use_cache = False
    model.model.norm = nn.Identity()
    model.lm_head = nn.Identity()
    rows = load_token_rows(cfg.dataset, tokenizer, cfg.eval.rows, cfg.training.seed)
    ctx = cfg.dataset.context_size
    rows_per_step = cfg.training.batch_size // ctx  # 32 rows of 128 = 4,096 positions
    bos = tokenizer.bos_token_id
    per_step = rows_per_step * (ctx - 1)  # non-BOS tokens of a step (a few rows hold 2 BOS)
    steps = max(1, round(tokens / per_step))
    it = rows.train_iter()
    ids = torch.stack([next(it) for _ in range(steps * rows_per_step)])
    trained_tokens = int((ids != bos).sum())
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    d_sae = cfg.sae.width(model.config.hidden_size)
    train_cfg = TrainConfig(
        SaeConfig(k=k, num_latents=d_sae),
        batch_size=rows_per_step,
        hookpoints=[f"layers.{layer}"],
        exclude_tokens=[bos],
        init_seeds=[cfg.training.seed],
        log_to_wandb=False,
        save_every=10**9,  # only the final save, inside fit()
        save_dir=str(work / "sparsify"),
        run_name="bench",
    )
    torch.manual_seed(cfg.training.seed)
    load_seconds = time.perf_counter() - t_load
    t0 = time.perf_counter()
    trainer = Trainer(train_cfg, dataset, model)
    construct = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.fit()
    fit = time.perf_counter() - t0
    return {
        "tokens": trained_tokens,
        "steps": steps,
        "rows_per_step": rows_per_step,
        "seconds": fit,
        "tokens_per_second": trained_tokens / fit,
        "trainer_construct_seconds": construct,
        "load_seconds": load_seconds,
        "settings": {
            "k": k,
            "num_latents": d_sae,
            "hookpoint": f"layers.{layer}",
            "optimizer": train_cfg.optimizer,
            "lr": train_cfg.lr,
            "loss_fn": train_cfg.loss_fn,
            "exclude_tokens": [bos],
            "lm": f"{model_dir} truncated to layers[:{layer + 1}], norm and lm_head = Identity",
        },
    }


def worker_saelens(tokens: int, k: int, work: Path) -> dict[str, Any]:
    """bench_vs_saelens.run_saelens, as imported; a small eval of the saved SAE follows it."""
    import torch

    sys.path.insert(0, str(BENCH))
    import bench_vs_saelens as bvs

    from saesweep.activations.source import ActivationSource
    from saesweep.data.rows import load_token_rows
    from saesweep.lm.model import load_model

    cfg = bvs.compose_config(bvs.parse_args(["--tokens", str(tokens), "--k", str(k)]))
    cfg.eval.rows, cfg.eval.ce_rows = 16, 2  # the post-run evaluation only; not timed
    device = torch.device("cpu")
    steps_tokens = (cfg.training.total_tokens // cfg.training.batch_size) * cfg.training.batch_size
    t0 = time.perf_counter()
    model = load_model(cfg.model, device, cfg.cache_dir)
    rows = load_token_rows(cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.training.seed)
    source = ActivationSource(model, cfg.model.hook_point, cfg.model.hook_point_out, cfg.activations.exclude_bos)
    load_seconds = time.perf_counter() - t0
    r = bvs.run_saelens(cfg, model, rows, source, work, steps_tokens, "cpu")
    comp = r["component_seconds"]
    loop = r["wall_seconds"] - comp.get("norm_estimate", 0.0) - comp.get("save_final_sae", 0.0)
    return {
        "tokens": r["tokens"],
        "seconds": r["wall_seconds"],
        "tokens_per_second": r["wall_tokens_per_second"],
        "seconds_without_norm_estimate": loop,
        "tokens_per_second_without_norm_estimate": r["tokens"] / loop,
        "component_seconds": comp,
        "runner_construct_seconds": r["runner_construct_seconds"],
        "load_seconds": load_seconds,
        "settings": r["settings"],
        "l0": r["l0"],
        "explained_variance": r["explained_variance"],
    }


WORKERS = {"sparsify": worker_sparsify, "saelens": worker_saelens}


# --- driver ---------------------------------------------------------------------


def saesweep_cmd(name: str, tokens: int, k: int, run_dir: Path) -> list[str]:
    return [
        PY,
        "-m",
        "saesweep.train",
        *SAESWEEP_ARMS[name],
        *COMMON,
        f"sae.k={k}",
        f"training.total_tokens={tokens}",
        *EVAL,
        f"hydra.run.dir={run_dir}",
    ]


def run_arm(name: str, tokens: int, ceiling_tokens: int, work: Path, tag: str, k: int = 32) -> dict[str, Any]:
    """One process for one arm; returns its figures, the command and the load around it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = work / f"{name}-{tag}.json"
    if name in SAESWEEP_ARMS:
        run_dir = work / f"{name}-{tag}"
        cmd = saesweep_cmd(name, tokens, k, run_dir)
    elif name in CEILING_ARMS:
        cmd = [PY, str(BENCH / "bench_lm.py"), *CEILING_ARMS[name], "--tokens", str(ceiling_tokens), "--out", str(out)]
    else:
        worker, extra_env = PEER_VARIANTS.get(name, (name, {}))
        env.update(extra_env)
        cmd = [
            PY,
            str(Path(__file__).resolve()),
            "--worker",
            worker,
            "--tokens",
            str(tokens),
            "--k",
            str(k),
            "--worker-out",
            str(out),
            "--work",
            str(work / f"{name}-{tag}"),
        ]
    before = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    process_seconds = time.perf_counter() - t0
    (work / f"{name}-{tag}.log").write_text(proc.stdout + proc.stderr)
    rec: dict[str, Any] = {
        "arm": name,
        "tag": tag,
        "command": " ".join(c.replace(PY, "python") for c in cmd),
        "process_seconds": round(process_seconds, 1),
        "load_1min_before_after": [before, loadavg()],
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        rec["error"] = (proc.stderr or proc.stdout)[-2000:]
        return rec
    if name in SAESWEEP_ARMS:
        ev = json.loads((run_dir / "eval.json").read_text())
        rec.update(
            tokens=ev["tokens_trained"],
            seconds=ev["train_seconds"],
            tokens_per_second=ev["tokens_per_second"],
            l0=ev["l0"],
            explained_variance=ev["explained_variance"],
        )
    elif name in CEILING_ARMS:
        r = json.loads(out.read_text())
        rec.update(tokens=r["tokens"], seconds=r["seconds"], tokens_per_second=r["tokens_per_second"])
    else:
        rec.update(json.loads(out.read_text()))
    return rec


def median_of(runs: list[dict[str, Any]], name: str, key: str = "tokens_per_second") -> float | None:
    vals = [r[key] for r in runs if r["arm"] == name and key in r]
    return statistics.median(vals) if vals else None


def summarize(results: dict[str, Any]) -> None:
    runs = results["runs"]
    arms = results["arms"]
    med = {a: median_of(runs, a) for a in arms}
    results["median_tokens_per_second"] = med
    if "saelens" in arms:
        med["saelens_without_norm_estimate"] = median_of(runs, "saelens", "tokens_per_second_without_norm_estimate")
    btk = {a: v for a, v in med.items() if a.startswith("saesweep_batchtopk") and v}
    # The bars compare like with like: fp32, as both peers train on a CPU.
    btk_fp32 = {a: v for a, v in btk.items() if a.endswith("fp32")}
    ratios: dict[str, Any] = {}
    if btk_fp32:
        best = max(btk_fp32, key=btk_fp32.get)
        ratios["saesweep_batchtopk_best_arm"] = best
        for peer in ("sparsify", "sparsify_kept_memory", "saelens", "saelens_without_norm_estimate"):
            if med.get(peer):
                ratios[f"saesweep_batchtopk_best_over_{peer}"] = btk[best] / med[peer]
    for a, v in btk.items():
        for peer in ("sparsify", "sparsify_kept_memory", "saelens"):
            if med.get(peer):
                ratios[f"{a}_over_{peer}"] = v / med[peer]
    if med.get("saesweep_topk_hf_bf16") and med.get("sparsify"):
        ratios["saesweep_topk_hf_bf16_over_sparsify"] = med["saesweep_topk_hf_bf16"] / med["sparsify"]
    for a, ceiling in (
        ("saesweep_batchtopk_tl_fp32", "ceiling_tl_fp32"),
        ("saesweep_batchtopk_hf_fp32", "ceiling_hf_fp32"),
        ("saesweep_batchtopk_hf_bf16", "ceiling_hf_bf16"),
        ("sparsify", "ceiling_hf_fp32"),
        ("saelens", "ceiling_tl_fp32"),
    ):
        if med.get(a) and med.get(ceiling):
            ratios[f"{a}_fraction_of_{ceiling}"] = med[a] / med[ceiling]
    results["ratios"] = ratios
    # None: the peer was not run this time
    results["bars"] = {
        f"batchtopk_best_over_{peer}_>={bar}": None if ratio is None else ratio >= bar
        for peer, bar in (("sparsify", 1.05), ("saelens", 2))
        for ratio in [ratios.get(f"saesweep_batchtopk_best_over_{peer}")]
    }


def verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured in this run"}[met]


def fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(results: dict[str, Any]) -> str:
    m, s, runs = results["machine"], results["settings"], results["runs"]
    med, ratios = results["median_tokens_per_second"], results["ratios"]
    lines = [
        "# End to end from tokens (live LM), CPU: saesweep vs sparsify vs SAELens",
        "",
        f"Generated by `benchmarks/bench_e2e.py` ({results['finished'] or 'INCOMPLETE, stopped at ' + results['updated']}). "
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores shared with other jobs, torch {m['torch']} "
        f"({m['torch_threads']} threads), avx512_bf16: {m['avx512_bf16']}, sae-lens {m['sae_lens']}, "
        f"eai-sparsify {m['eai_sparsify']}, transformers {m['transformers']}, transformer-lens {m['transformer_lens']}.",
        "",
        f"Setup: SmolLM2-135M (embedded) layer 6 residual, Shakespeare rows of 128, BOS excluded, k={s['k']}, "
        f"4,608 latents, 4,096 tokens per step ({s['tokens']:,} tokens requested per run; sparsify: 32 rows per step, "
        f"4,064 non-BOS tokens), live activations, {s['repeats']} interleaved repeat(s) (arm order reversed on odd "
        f"repeats); ceilings: --tokens {s['ceiling_tokens']:,}, run in whole LM batches (see tokens per run). saesweep eval: {' '.join(EVAL)} (not timed).",
        "",
        "| arm | median tokens/s | runs (tokens/s) | tokens per run | load avg (1 min) before/after each run |",
        "|---|---:|---|---:|---|",
    ]
    for a in results["arms"]:
        rs = [r for r in runs if r["arm"] == a]
        vals = ", ".join(fmt(r.get("tokens_per_second")) if "tokens_per_second" in r else "FAILED" for r in rs)
        toks = ", ".join(sorted({fmt(r.get("tokens"), ",") for r in rs}))
        loads = "; ".join(f"{r['load_1min_before_after'][0]}/{r['load_1min_before_after'][1]}" for r in rs)
        lines.append(f"| {a} | **{fmt(med.get(a))}** | {vals} | {toks} | {loads} |")
    if med.get("saelens_without_norm_estimate"):
        lines.append(
            f"| saelens, without its norm-estimate batches | {fmt(med['saelens_without_norm_estimate'])} | "
            f"{', '.join(fmt(r.get('tokens_per_second_without_norm_estimate')) for r in runs if r['arm'] == 'saelens')} | | |"
        )
    lines += ["", "Ratios of medians:", ""]
    for key, v in ratios.items():
        lines.append(f"- {key}: {v if isinstance(v, str) else format(v, '.2f') + ('x' if '_over_' in key else '')}")
    b = results["bars"]
    lines += [
        "",
        f"Acceptance bar: saesweep BatchTopK end to end >= 1.05x sparsify: **{verdict(b['batchtopk_best_over_sparsify_>=1.05'])}** "
        f"({fmt(ratios.get('saesweep_batchtopk_best_over_sparsify'), '.2f')}x, best fp32 saesweep BatchTopK arm "
        f"`{ratios.get('saesweep_batchtopk_best_arm')}`; note sparsify is TopK, see the TopK row for like for like); "
        f">= 2x SAELens: **{verdict(b['batchtopk_best_over_saelens_>=2'])}** "
        f"({fmt(ratios.get('saesweep_batchtopk_best_over_saelens'), '.2f')}x against SAELens's run(); "
        f"{fmt(ratios.get('saesweep_batchtopk_best_over_saelens_without_norm_estimate'), '.2f')}x against its loop without the norm estimate).",
        "",
        "What each arm's time includes:",
        "",
        "- **saesweep_*** (`python -m saesweep.train`, one process per run): eval.json's `train_seconds` - from just "
        "before the first activation-buffer fill (LM forward included) to the last optimizer step. Excludes model "
        "load, threshold calibration, evaluation and export. `tl` = TransformerLens backend (the default), `hf` = "
        "`model=smollm2-135m-hf`, `bf16` = `training.autocast=bf16` (LM forward and SAE matmuls in bf16; "
        "neither peer can do this on a CPU, so the bars use the fp32 arms). Training keeps freed memory in the "
        "process (saesweep/allocator.py).",
        "- **sparsify** (eai-sparsify, its `Trainer.fit()`): the whole fit() call - LM forward (HF, fp32: its bf16 "
        "autocast is CUDA-only), TopK SAE step (signum + schedule-free, its defaults), its final save. Excludes model "
        "load and Trainer construction. Its LM was truncated after layer 6 (layers[:7], norm and lm_head = Identity), "
        "which its defaults do not do. tokens = non-BOS tokens fed (BOS excluded via `exclude_tokens`). No shuffling "
        "buffer: whole rows in our shuffled order. **sparsify_kept_memory**: the same, with glibc told to keep freed "
        "memory as saesweep does (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set at its process start).",
        "- **saelens** (sae-lens BatchTopK via `bench_vs_saelens.run_saelens`, unchanged): SAELens's whole "
        "`runner.run()` - norm-estimate LM batches (as many tokens as its 65,536-token buffer, capped by the run "
        "length; their first call also fills the buffer training uses), the training loop, weight folding, saving. "
        "The 'without its norm-estimate batches' row subtracts that component, which also removes its first buffer "
        "fill, so it overstates SAELens.",
        "- **ceiling_*** (`benchmarks/bench_lm.py`): LM forward to the hook only (the live feed's own code path), "
        "after one warm-up batch. Live training cannot pass it. `_glibc`: with glibc's default allocator "
        "settings instead of saesweep's (allocator.py).",
        "",
        "Each run's exact command is in the JSON (`runs[].command`; the peer arms run this script's `--worker` mode). "
        "Loads well above 2 mean other jobs competed for the 2 cores: absolute numbers are noisy, ratios of "
        "interleaved medians less so.",
    ]
    if results.get("note"):
        lines += ["", f"Note: {results['note']}"]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    summarize(results)
    save(results, out, markdown)


def save(results: dict[str, Any], out: Path, markdown: Any) -> None:
    """Stamp `results`, write them to `out` as JSON and `markdown(results)` beside it (.md)."""
    results["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=98_304, help="training tokens per run (24 steps of 4,096)")
    p.add_argument("--ceiling-tokens", type=int, default=49_152, help="tokens for each LM-forward ceiling run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--arms", default=",".join([*SAESWEEP_ARMS, *PEER_ARMS, *CEILING_ARMS]))
    p.add_argument("--out", type=Path, default=RESULTS / "e2e_cpu.json")
    p.add_argument("--note", default="")
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from --out's JSON")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        import logging

        logging.basicConfig(level=logging.INFO)
        args.work.mkdir(parents=True, exist_ok=True)
        result = WORKERS[args.worker](args.tokens, args.k, args.work)
        args.worker_out.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.report_only:
        results = json.loads(args.out.read_text())
        if args.note:
            results["note"] = args.note
        write(results, args.out)
        print(args.out.with_suffix(".md").read_text())
        return

    arms = args.arms.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    results: dict[str, Any] = {
        "benchmark": "e2e_from_tokens_live",
        "machine": machine_info(),
        "arms": arms,
        "work_dir": str(work),
        "settings": {
            "tokens": args.tokens,
            "ceiling_tokens": args.ceiling_tokens,
            "repeats": args.repeats,
            "k": args.k,
            "d_sae": 4608,
            "batch_tokens": 4096,
            "saesweep_eval": EVAL,
            "common_overrides": COMMON,
        },
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "note": args.note,
        "runs": [],
    }
    for rep in range(args.repeats):
        for name in arms if rep % 2 == 0 else arms[::-1]:
            rec = run_arm(name, args.tokens, args.ceiling_tokens, work, f"r{rep}", args.k)
            print(
                json.dumps(
                    {
                        k: rec.get(k)
                        for k in (
                            "arm",
                            "tag",
                            "tokens_per_second",
                            "process_seconds",
                            "load_1min_before_after",
                            "returncode",
                        )
                    }
                ),
                flush=True,
            )
            if "error" in rec:
                print(rec["error"], file=sys.stderr, flush=True)
            results["runs"].append(rec)
            write(results, args.out)
    results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write(results, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
