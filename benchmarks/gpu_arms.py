#!/usr/bin/env python
"""The parts of benchmarks/gpu_run.sh that are Python: random-weight models, sparsify's
Trainer.fit() arm, a profiled window of steady training steps, and the summary.

    python benchmarks/gpu_arms.py models --config .gpu/smollm2 --out /tmp/gpu [--tiny]
    python benchmarks/gpu_arms.py sparsify --model /tmp/gpu/smol --tokens N --rows 32 --out a.json
    python benchmarks/gpu_arms.py profile --out p.json KEY=VALUE ...   (saesweep.train overrides)
    python benchmarks/gpu_arms.py summary --work /tmp/gpu --out $OUT

Each arm writes one JSON; `summary` bundles them into gpu_results.json and gpu_results.md
(the device tool returns at most 8 files) with the figures issue 17's acceptance reads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


# --- models ----------------------------------------------------------------------------


def build_models(config_dir: Path, out: Path, tiny: bool) -> None:
    """SmolLM2-135M's architecture and a 1.07B Llama-style LM (hidden 2048, 16 layers), both
    with random weights and SmolLM2's tokenizer; --tiny: toy widths, for a CPU dry run."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {
        "smol": {} if not tiny else dict(hidden_size=64, num_hidden_layers=8, intermediate_size=128),
        "llama1b": dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
        )
        if not tiny
        else dict(
            hidden_size=128, num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
        ),
    }
    if tiny:
        shapes["smol"].update(num_attention_heads=4, num_key_value_heads=2)
    for name, shape in shapes.items():
        t0 = time.perf_counter()
        cfg = AutoConfig.from_pretrained(config_dir)
        for key, value in shape.items():
            setattr(cfg, key, value)
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if name == "llama1b" else None)
        target = out / name
        model.save_pretrained(target)
        for f in config_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy(f, target / f.name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.0f}M parameters, {time.perf_counter() - t0:.0f} s", flush=True)
        del model


# --- sparsify ------------------------------------------------------------------------


def sparsify_arm(model_dir: Path, tokens: int, rows_per_step: int, k: int, layer: int, work: Path) -> dict[str, Any]:
    """EleutherAI sparsify's own Trainer(...).fit() on the same model, rows and sizes as
    bench_e2e.worker_sparsify, with the LM (truncated after the hooked layer) on the GPU."""
    import datasets
    from sparsify import SaeConfig, TrainConfig, Trainer
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saesweep.config.schema import DatasetConfig
    from saesweep.data.rows import load_token_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.eval()
    model.model.layers = model.model.layers[: layer + 1]
    model.config.num_hidden_layers = layer + 1
    model.config.use_cache = False
    model.model.norm = nn.Identity()
    model.lm_head = nn.Identity()
    dataset_cfg = DatasetConfig()
    rows = load_token_rows(dataset_cfg, tokenizer, 64, 42)
    ctx = dataset_cfg.context_size
    steps = max(1, round(tokens / (rows_per_step * (ctx - 1))))
    it = rows.train_iter()
    ids = torch.stack([next(it) for _ in range(steps * rows_per_step)])
    bos = tokenizer.bos_token_id
    trained = int((ids != bos).sum())
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    d_sae = 8 * model.config.hidden_size
    cfg = TrainConfig(
        SaeConfig(k=k, num_latents=d_sae),
        batch_size=rows_per_step,
        hookpoints=[f"layers.{layer}"],
        exclude_tokens=[bos],
        init_seeds=[42],
        log_to_wandb=False,
        save_every=10**9,
        save_dir=str(work / "sparsify"),
        run_name="bench",
    )
    torch.manual_seed(42)
    trainer = Trainer(cfg, dataset, model)
    t0 = time.perf_counter()
    trainer.fit()
    fit = time.perf_counter() - t0
    return {
        "tokens": trained,
        "steps": steps,
        "rows_per_step": rows_per_step,
        "seconds": fit,
        "tokens_per_second": trained / fit,
        "settings": {"k": k, "num_latents": d_sae, "hookpoint": f"layers.{layer}", "device": device},
    }


# --- profile ---------------------------------------------------------------------------


def profile_arm(overrides: list[str], skip: int, window: int, run_dir: Path) -> dict[str, Any]:
    """Train as `python -m saesweep.train OVERRIDES` does, with a torch.profiler window over
    `window` steady steps after `skip`: the device's busy time (the union of its kernels'
    intervals) as a share of the window's wall time, and the most frequent ops."""
    from hydra import compose, initialize_config_dir
    from torch.profiler import ProfilerActivity, profile

    from saesweep.activations import buffer as buffer_module
    from saesweep.config.schema import validate
    from saesweep.training import loop

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = validate(compose("train", overrides))
    cuda = torch.cuda.is_available() and cfg.training.device != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    state: dict[str, Any] = {"calls": 0}
    next_batch = buffer_module.ActivationBuffer.next_batch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        state["calls"] += 1
        if state["calls"] == skip + 1:
            sync()
            state["prof"] = profile(activities=activities)
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        elif state["calls"] == skip + window + 1:
            sync()
            state["wall"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)
        return next_batch(self, *args, **kwargs)

    buffer_module.ActivationBuffer.next_batch = counted
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        loop.train(cfg, run_dir)
    finally:
        buffer_module.ActivationBuffer.next_batch = next_batch
    if "wall" not in state:
        raise SystemExit(f"profile: training took {state['calls']} batches, fewer than {skip + window + 1}")
    events = state["prof"].events()
    kind = "cuda" if cuda else "cpu"
    if cuda:
        spans = [
            (e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA
        ]
    else:  # a dry run's stand-in: top-level CPU ops
        spans = [(e.time_range.start, e.time_range.end) for e in events if e.cpu_parent is None]
    busy_us, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            busy_us += stop - max(start, end)
            end = stop
    counts: dict[str, int] = {}
    for e in events:
        counts[e.name] = counts.get(e.name, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:25]
    table = state["prof"].key_averages().table(sort_by=f"{'cuda' if cuda else 'cpu'}_time_total", row_limit=30)
    return {
        "steps": window,
        "wall_seconds": state["wall"],
        "wall_ms_per_step": 1000 * state["wall"] / window,
        "busy_ms_per_step": busy_us / 1000 / window,
        "device_busy_fraction": busy_us / 1e6 / state["wall"],
        "busy_of": kind,
        "op_counts": dict(top),
        "table": table,
    }


# --- summary ---------------------------------------------------------------------------


def load(work: Path, name: str) -> dict[str, Any] | None:
    path = work / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_rate(run_dir: Path) -> dict[str, Any] | None:
    """tokens/s of a finished saesweep run (eval.json)."""
    try:
        e = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: e.get(k) for k in ("tokens_trained", "train_seconds", "tokens_per_second", "activation_source")}


def group_rate(sweep_dir: Path) -> dict[str, Any] | None:
    """A grouped sweep's SAE tokens per second: all members' tokens over the shared train time."""
    members = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/eval.json"))]
    if not members:
        return None
    seconds = max(m["train_seconds"] for m in members)
    tokens = sum(m["tokens_trained"] for m in members)
    return {
        "members": len(members),
        "tokens": tokens,
        "train_seconds": seconds,
        "sae_tokens_per_second": tokens / seconds,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def summary(work: Path, out: Path, meta: dict[str, Any]) -> None:
    lm = load(work, "lm_smol") or {}
    lm1b = load(work, "lm_1b") or {}
    runs = {
        name: run_rate(work / name) for name in ("run_default", "run_compiled", "run_one", "run_1b", "run_1b_compiled")
    }
    groups = {name: group_rate(work / name) for name in ("group8", "group8_1b")}
    sparsify = load(work, "sparsify")
    prof = load(work, "profile")
    steps = {name: load(work, name) for name in ("step_2048", "step_4096")}
    feed = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("feed_*.json"))}

    def rate(name: str) -> float | None:
        r = runs.get(name)
        return r["tokens_per_second"] if r else None

    g8, g8b = groups["group8"], groups["group8_1b"]
    figures = {
        "lm_ceiling_tokens_per_second": lm.get("tokens_per_second"),
        "default_tokens_per_second": rate("run_default"),
        "default_share_of_ceiling": ratio(rate("run_default"), lm.get("tokens_per_second")),
        "compiled_tokens_per_second": rate("run_compiled"),
        "compiled_over_eager": ratio(rate("run_compiled"), rate("run_default")),
        "sparsify_tokens_per_second": sparsify and sparsify.get("tokens_per_second"),
        "default_over_sparsify": ratio(rate("run_default"), sparsify and sparsify.get("tokens_per_second")),
        "group8_sae_tokens_per_second": g8 and g8["sae_tokens_per_second"],
        "one_run_tokens_per_second": rate("run_one"),
        "group8_over_one_run": ratio(g8 and g8["sae_tokens_per_second"], rate("run_one")),
        "device_busy_fraction": prof and prof["device_busy_fraction"],
        "lm1b_ceiling_tokens_per_second": lm1b.get("tokens_per_second"),
        "lm1b_one_run_tokens_per_second": rate("run_1b"),
        "lm1b_share_of_ceiling": ratio(rate("run_1b"), lm1b.get("tokens_per_second")),
        "lm1b_compiled_tokens_per_second": rate("run_1b_compiled"),
        "lm1b_group8_over_one_run": ratio(g8b and g8b["sae_tokens_per_second"], rate("run_1b")),
    }
    for name, result in steps.items():
        if result:
            figures[f"{name}_ms"] = {k: 1000 * v for k, v in result["median_seconds_per_step"].items()}
    bars = {
        "default_share_of_ceiling": 0.6,
        "default_over_sparsify": 3.0,
        "group8_over_one_run": 5.0,
        "device_busy_fraction": 0.7,
        "lm1b_share_of_ceiling": 0.8,
        "lm1b_group8_over_one_run": 4.0,
    }
    result = {
        "meta": {**meta, "python": platform.python_version(), "torch": torch.__version__},
        "figures": figures,
        "acceptance_bars": bars,
        "lm_forward": {"smol": lm, "llama1b": lm1b},
        "runs": runs,
        "groups": groups,
        "sparsify": sparsify,
        "profile": {k: v for k, v in (prof or {}).items() if k != "table"},
        "steps": steps,
        "feed": feed,
    }
    write(out / "gpu_results.json", result)
    lines = [
        f"# GPU run ({meta.get('device', '?')}, {meta.get('mode', '')})",
        "",
        "| figure | value | bar |",
        "|---|---:|---:|",
    ]
    for key, value in figures.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.2f}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
        bar = bars.get(key)
        lines.append(f"| {key} | {value} | {'>= ' + str(bar) if bar else ''} |")
    if prof and prof.get("table"):
        lines += ["", "## profile", "", "```", prof["table"], "```"]
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 4 + len(figures)]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models")
    m.add_argument("--config", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--tiny", action="store_true")
    s = sub.add_parser("sparsify")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--tokens", type=int, required=True)
    s.add_argument("--rows", type=int, default=32, help="rows of 128 per step (32: 4,096 positions)")
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--layer", type=int, default=6)
    s.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("profile")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--skip", type=int, default=40)
    f.add_argument("--window", type=int, default=64)
    f.add_argument("--run-dir", type=Path, required=True)
    f.add_argument("overrides", nargs="*")
    u = sub.add_parser("summary")
    u.add_argument("--work", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--meta", default="{}", help="JSON: device, mode")
    args = p.parse_args()
    if args.cmd == "models":
        build_models(args.config, args.out, args.tiny)
    elif args.cmd == "sparsify":
        write(args.out, sparsify_arm(args.model, args.tokens, args.rows, args.k, args.layer, args.out.parent))
    elif args.cmd == "profile":
        write(args.out, profile_arm(args.overrides, args.skip, args.window, args.run_dir))
    else:
        summary(args.work, args.out, json.loads(args.meta))


if __name__ == "__main__":
    main()
