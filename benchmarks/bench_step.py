#!/usr/bin/env python
"""SAE training step alone, on activations already in memory: saesweep vs SAELens vs sparsify.

Part (a) of the benchmark suite: no language model in the timed span. Every trainer
gets the same [tokens, d_in] activations (real ones: SmolLM2 layer 6 residual stream
on Shakespeare, BOS dropped, or random ones with --random) and takes the same number
of optimizer steps of `--batch` tokens, each step as that trainer's own loop does it:

  saesweep   BatchTopK and TopK as `saesweep.training.member` steps them: forward (sparse
             decoder), summed losses, backward, grad-norm clip with the finiteness check
             (on the device: fused Adam skips a non-finite step), Adam, scheduler,
             after_step (threshold EMA, decoder norms); no metrics read back.
  SAELens    BatchTopKTrainingSAE.training_forward_pass (its AuxK on), its firing
             statistics, backward, clip 1.0, Adam, scheduler - as SAETrainer._train_step.
  sparsify   SparseCoder (TopK, unit-norm decoder), FVU loss against the batch variance,
             backward, removal of the gradient parallel to decoder rows, schedule-free
             sign-SGD - as sparsify's Trainer.fit.

A trainer name may carry options: `+bf16` runs its forward under bf16 autocast (as
each trainer's own `autocast` setting does), `+compile` compiles saesweep's step as
training.compile does (forward, losses, backward; CUDA graphs on a GPU),
`+sparse` / `+dense` force saesweep's kernels (saesweep.sae.sparse.KERNELS) instead of
the per-device choice, `+sparsedec` only the decoder's, e.g. `saesweep_topk+bf16+compile`.

Repeats are interleaved (A B C, A B C, ...) so drift in a shared machine's load hits
every trainer alike; the table shows medians and the ratios of medians. On a GPU the
table adds achieved TFLOP/s: the FLOPs a TopK step needs (dense encoder forward
2*d_in*d_sae per token, plus 8*d_in*k for the sparse decoder and both weight
gradients' active rows) over the step time, and their fraction of the bf16 matrix
product rate measured in the same run (`--peak`).

    python benchmarks/bench_step.py                       # CPU, d_sae 4608, 3 repeats
    python benchmarks/bench_step.py --device cuda --d-sae 24576 --d-in 768 --random --peak \
        --trainers saesweep_topk+bf16,sparsify_topk+bf16
    # issue 17's widths (the 1B-class LM's d_in 2048, and twice that), k 32, 4096 tokens:
    python benchmarks/bench_step.py --device cuda --random --d-in 2048 --d-sae 16384 \
        --trainers saesweep_batchtopk+bf16,saesweep_batchtopk+bf16+compile,sparsify_topk,saelens_batchtopk+bf16
    python benchmarks/bench_step.py --device cuda --random --d-in 4096 --d-sae 65536 ...

Writes benchmarks/results/step_<device>.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def real_activations(tokens: int, device: torch.device) -> torch.Tensor:
    """SmolLM2 layer-6 residual activations of the first training rows, BOS dropped."""
    from saesweep.activations.source import ActivationSource
    from saesweep.config.schema import DatasetConfig, ModelConfig
    from saesweep.data.rows import load_token_rows
    from saesweep.lm.model import load_model

    model = load_model(ModelConfig(), torch.device("cpu"), None)
    rows = load_token_rows(DatasetConfig(), model.tokenizer, 16, seed=0)
    source = ActivationSource(model, "blocks.6.hook_resid_post", None, exclude_bos=True)
    chunks, have = [], 0
    for (x,) in source.batches(rows.train_iter(), 32):
        chunks.append(x)
        have += len(x)
        if have >= tokens:
            break
    return torch.cat(chunks)[:tokens].to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# Each factory returns step(x) -> None, with its model and optimizer built and warm.


def autocast(on: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def saesweep_step(
    arch: str,
    d_in: int,
    d_sae: int,
    k: int,
    acts: torch.Tensor,
    bf16: bool = False,
    compile: bool = False,
    kernels: tuple[str, str] = ("auto", "auto"),
) -> Callable[[torch.Tensor], None]:
    from saesweep.config.schema import OptimizerConfig, SchedulerConfig
    from saesweep.sae import ARCHITECTURES, build_sae, sparse
    from saesweep.training.compiled import SAEStep
    from saesweep.training.optim import build_optimizer, build_scheduler

    cfg = ARCHITECTURES[arch].config_class(architecture=arch, d_sae=d_sae, k=k)
    sae = build_sae(cfg, d_in).to(acts.device)
    sae.fit_to_data(acts[:4096], acts[:4096])
    optimizer = build_optimizer(sae.param_groups(), OptimizerConfig())
    scheduler = build_scheduler(optimizer, 10**9, SchedulerConfig())
    sae.train()
    state = {"step": 0}

    def forward_loss(x: torch.Tensor, target: torch.Tensor, step: int):
        with autocast(bf16, x.device):
            out = sae(x, target, step)
            return out, sum(out.losses.values())

    # Forward, losses and backward as the trainer takes them (training.compile: compiled).
    sae_step = SAEStep(
        forward_loss, partial(optimizer.zero_grad, set_to_none=True), sae, acts.device, compile, f"bench {arch}"
    )

    def step(x: torch.Tensor) -> None:
        sparse.KERNELS = sparse.Kernels(*kernels)  # module state: set per step, as trainers interleave
        out, loss = sae_step(x, x, state["step"])
        norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        # As the trainer: a non-finite step is skipped on the device, with no host sync.
        applied = torch.isfinite(loss.detach() + norm)
        optimizer.found_inf = (~applied).float()
        optimizer.step()
        scheduler.step()
        sae.after_step(applied)
        state["step"] += 1

    return step


def saelens_step(
    d_in: int, d_sae: int, k: int, acts: torch.Tensor, bf16: bool = False
) -> Callable[[torch.Tensor], None]:
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=str(acts.device)))
    optimizer = torch.optim.Adam(sae.parameters(), lr=4e-4, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    # As SAETrainer: each coefficient's value (a float or a warm-up config); none for BatchTopK.
    coefficients = {name: float(getattr(c, "value", c)) for name, c in sae.get_coefficients().items()}
    since_fired = torch.zeros(d_sae, device=acts.device)
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        sae.train()
        with autocast(bf16, x.device):  # SAELens's `autocast` option wraps the forward pass alike
            out = sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=x,
                    coefficients=coefficients,
                    dead_neuron_mask=since_fired > 1000,
                    n_training_steps=state["step"],
                    is_logging_step=False,
                )
            )
        with torch.no_grad():
            fired = out.feature_acts.bool().float()
            since_fired.add_(1)
            since_fired[fired.sum(-2).bool()] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        state["step"] += 1

    return step


def sparsify_step(
    d_in: int, d_sae: int, k: int, acts: torch.Tensor, bf16: bool = False
) -> Callable[[torch.Tensor], None]:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=acts.device, dtype=torch.float32)
    sae.b_dec.data = acts[:4096].mean(0)
    optimizer = ScheduleFreeWrapper(
        SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (d_sae / 2**14) ** 0.5}]), momentum=0.95
    )
    optimizer.train()

    def step(x: torch.Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        # Its forward autocasts to bf16 on CUDA by itself; +bf16 does the same on a CPU.
        with autocast(bf16, x.device):
            out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        out.fvu.backward()
        float(out.fvu.detach())  # sparsify's loop reads the loss every step for its logs
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return step


def time_steps(
    step: Callable[[torch.Tensor], None],
    acts: torch.Tensor,
    batch: int,
    steps: int,
    device: torch.device,
    warmup: int = 2,
) -> float:
    """Seconds per step over `steps` steps (after `warmup` steps), cycling through acts."""
    n = len(acts) // batch
    for i in range(warmup):
        step(acts[(i % n) * batch : (i % n + 1) * batch])
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        j = i % n
        step(acts[j * batch : (j + 1) * batch])
    sync(device)
    return (time.perf_counter() - start) / steps


def build_step(spec: str, args: argparse.Namespace, acts: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A trainer's step from a name like `saesweep_topk+bf16+compile`."""
    name, *opts = spec.split("+")
    unknown = set(opts) - {"bf16", "compile", "sparse", "dense", "sparsedec"}
    if unknown:
        raise SystemExit(
            f"--trainers: unknown option(s) {sorted(unknown)} in {spec!r}; "
            "valid: bf16, compile, sparse, dense, sparsedec"
        )
    bf16 = "bf16" in opts
    both = "dense" if "dense" in opts else "sparse" if "sparse" in opts else "auto"
    kernels = (both, "sparse" if "sparsedec" in opts else both)
    if name in ("saesweep_batchtopk", "saesweep_topk"):
        return saesweep_step(
            name.removeprefix("saesweep_"), args.d_in, args.d_sae, args.k, acts, bf16, "compile" in opts, kernels
        )
    if opts and set(opts) != {"bf16"}:
        raise SystemExit(f"--trainers: {name} takes only +bf16")
    if name == "saelens_batchtopk":
        return saelens_step(args.d_in, args.d_sae, args.k, acts, bf16)
    if name == "sparsify_topk":
        return sparsify_step(args.d_in, args.d_sae, args.k, acts, bf16)
    raise SystemExit(
        f"--trainers: unknown trainer {name!r}; valid: saesweep_batchtopk, saesweep_topk, "
        "saelens_batchtopk, sparsify_topk"
    )


def bf16_matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """The device's bf16 matrix-product rate, measured: the ceiling the SAE step is judged by."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def host_syncs_per_step(step: Callable[[torch.Tensor], None], x: torch.Tensor) -> int:
    """How many times one step waits for the GPU (CUDA's sync debug mode warns at each)."""
    import warnings

    step(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_table(step: Callable[[torch.Tensor], None], x: torch.Tensor, device: torch.device) -> str:
    """Where a step's time goes, per kernel/operator (torch.profiler, 5 steps after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step(x)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step(x)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--random", action="store_true", help="Gaussian activations instead of SmolLM2's (needed when d_in != 576)"
    )
    p.add_argument("--trainers", default="saesweep_batchtopk,saesweep_topk,saelens_batchtopk,sparsify_topk")
    p.add_argument("--peak", action="store_true", help="measure the bf16 matrix-product rate (GPU)")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of this trainer's step")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    # As in training (saesweep/allocator.py); it applies to every arm of this process alike.
    from saesweep.training.allocator import keep_freed_memory

    keep_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(0)
    n_tokens = args.batch * 4
    if args.random:
        acts = torch.randn(n_tokens, args.d_in, device=device)
    else:
        if args.d_in != 576:
            p.error("--d-in other than 576 needs --random (SmolLM2's residual stream is 576 wide)")
        acts = real_activations(n_tokens, device)

    names = args.trainers.split(",")
    steps, unavailable = {}, {}
    for name in names:
        try:
            steps[name] = build_step(name, args, acts)
        except Exception as e:  # a peer that will not install or import here: say so in the table
            if name.startswith("saesweep"):
                raise
            unavailable[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{name}: unavailable ({unavailable[name]})", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        for name, step in steps.items():
            s = time_steps(step, acts, args.batch, args.steps, device, args.warmup if repeat == 0 else 1)
            seconds[name].append(s)
            print(f"repeat {repeat}: {name:32s} {s * 1000:8.2f} ms/step  {args.batch / s:12,.0f} tokens/s", flush=True)

    median = {name: statistics.median(v) for name, v in seconds.items()}
    out = args.out or REPO / "benchmarks" / "results" / f"step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "sae_step_only",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": machine(device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds_per_step": seconds,
        "median_seconds_per_step": median,
        "median_tokens_per_second": {name: args.batch / s for name, s in median.items()},
        "unavailable": unavailable,
        # FLOPs per token a TopK step needs: dense encoder forward, then the k active rows in
        # the decoder forward, its two gradients and the encoder's weight gradient.
        "needed_flop_per_token": 2 * args.d_in * args.d_sae + 8 * args.d_in * args.k,
        "dense_flop_per_token": 10 * args.d_in * args.d_sae,
    }
    if device.type == "cuda":
        x = acts[: args.batch]
        result["host_syncs_per_step"] = {name: host_syncs_per_step(step, x) for name, step in steps.items()}
        print("host syncs per step:", result["host_syncs_per_step"], flush=True)
    if args.peak:
        result["bf16_matmul_tflops"] = bf16_matmul_tflops(device)
        print(f"bf16 matmul: {result['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)
    if args.profile:
        table = profile_table(steps[args.profile], acts[: args.batch], device)
        prof_path = out.with_name(out.stem + "_profile.txt")
        prof_path.write_text(f"{args.profile}\n{table}\n")
        print(table, flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "load_average": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for package in ("sae_lens", "sparsify"):
        try:
            from importlib.metadata import version

            info[package] = version(package.replace("_", "-") if package == "sae_lens" else "eai-sparsify")
        except Exception:
            info[package] = None
    return info


def markdown(r: dict) -> str:
    c, med = r["config"], r["median_seconds_per_step"]
    ours = min((s for n, s in med.items() if n.startswith("saesweep")), default=None)
    lines = [
        "# SAE training step alone (activations in memory)",
        "",
        f"Generated by `benchmarks/bench_step.py` on {r['date']}: d_in {c['d_in']}, d_sae {c['d_sae']}, "
        f"k {c['k']}, {c['batch']} tokens/step, {c['steps']} timed steps x {c['repeats']} interleaved repeats, "
        f"{'random' if c['random'] else 'SmolLM2 layer-6'} activations, device `{c['device']}`.",
        "",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, torch {r['machine']['torch']} "
        f"({r['machine']['torch_threads']} threads), GPU: {r['machine']['gpu'] or 'none'}, "
        f"sae-lens {r['machine']['sae_lens']}, eai-sparsify {r['machine']['sparsify']}; "
        f"load average at the end {', '.join(f'{x:.2f}' for x in r['machine']['load_average'])}.",
        "",
    ]
    peak = r.get("bf16_matmul_tflops")
    syncs = r.get("host_syncs_per_step", {})
    head = "| trainer | median ms/step | tokens/s | fastest saesweep / this |"
    rule = "|---|---:|---:|---:|"
    if peak:
        head += " needed TFLOP/s | % of bf16 peak | dense-equivalent TFLOP/s | host syncs/step |"
        rule += "---:|---:|---:|---:|"
    lines += [head, rule]
    for name, s in med.items():
        row = f"| {name} | {s * 1000:.2f} | {c['batch'] / s:,.0f} | {s / ours:.2f}x |"
        if peak:
            needed = r["needed_flop_per_token"] * c["batch"] / s / 1e12
            dense = r["dense_flop_per_token"] * c["batch"] / s / 1e12
            row += f" {needed:.1f} | {100 * needed / peak:.1f} % | {dense:.1f} | {syncs.get(name, '')} |"
        lines.append(row)
    for name, why in r.get("unavailable", {}).items():
        lines.append(f"| {name} | not run: {why} | | |")
    if peak:
        lines += [
            "",
            f"bf16 peak: an 8192^3 bf16 matrix product measured {peak:.0f} TFLOP/s in this run. "
            f"Needed FLOPs: {r['needed_flop_per_token'] / 1e6:.1f} MFLOP/token (dense encoder forward + "
            f"sparse decoder and gradients); dense-equivalent: {r['dense_flop_per_token'] / 1e6:.1f} "
            "MFLOP/token (what a dense SAE step of this size computes).",
        ]
    base = {n.split("+")[0] for n in med}
    pairs = [
        ("saesweep_batchtopk", "saelens_batchtopk"),
        ("saesweep_batchtopk", "sparsify_topk"),
        ("saesweep_topk", "sparsify_topk"),
        ("saesweep_topk", "saelens_batchtopk"),
    ]
    best = {b: min(med[n] for n in med if n.split("+")[0] == b) for b in base}
    like = [f"{a} is {best[b] / best[a]:.2f}x {b}" for a, b in pairs if a in best and b in best]
    if like:
        lines += ["", "Speed-ups (best variant of each, ratio of median step times): " + "; ".join(like) + "."]
    lines += [
        "",
        "Per-repeat ms/step: "
        + "; ".join(f"{n} " + ", ".join(f"{v * 1000:.0f}" for v in vals) for n, vals in r["seconds_per_step"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
