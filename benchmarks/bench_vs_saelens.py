#!/usr/bin/env python
"""Benchmark saesweep's BatchTopK trainer against SAELens's, in one process.

Both trainers get the same language model object, hook, k, d_sae, batch size,
token count, optimizer settings, activation buffer size and training rows; both
compute activations live (LM forward included in their timings). Each final SAE
is then loaded from disk in SAELens's inference form (BatchTopK is saved as a
JumpReLU SAE by both) and evaluated by the *same* saesweep evaluation code on the
*same* held-out rows: explained variance in float64 with BOS excluded, L0, dead
fraction, and the CE loss score.

    python benchmarks/bench_vs_saelens.py                      # 1M tokens (~25 min on 2 CPU cores)
    python benchmarks/bench_vs_saelens.py --tokens 40960 --out /tmp/bench_small.json

Writes the results as JSON (--out) and a markdown table next to it (same stem, .md).

Timings reported (seconds are wall-clock, time.perf_counter):
  ours.trainer_seconds / trainer_tokens_per_second
      the trainer's own figures (eval.json's train_seconds / tokens_per_second),
      over whatever span saesweep.training.loop times: at the time of writing, from just
      before the first buffer fill to the last optimizer step (so excluding
      threshold calibration, evaluation and export).
  ours.wall_seconds / wall_tokens_per_second
      the whole train() call minus its evaluate() call: the first buffer fill, the
      loop, calibration and writing the SAE. The model and the token rows are
      loaded once beforehand and shared with SAELens, so neither side pays for
      loading them.
  saelens.wall_seconds / wall_tokens_per_second
      SAELens's whole runner.run() (norm-estimate LM batches, training loop,
      weight folding, writing the SAE). Runner construction is timed separately.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"

log = logging.getLogger("bench_vs_saelens")


# --- arguments and config ------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tokens",
        type=int,
        default=1_000_000,
        help="training tokens (rounded down to whole batches, for both trainers)",
    )
    p.add_argument("--k", type=int, default=32, help="BatchTopK k (mean active latents per token)")
    p.add_argument("--expansion-factor", type=int, default=8, help="d_sae = expansion factor x d_model")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per optimizer step")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results" / "vs_saelens.json",
        help="results JSON; a markdown table is written next to it with suffix .md",
    )
    p.add_argument(
        "--order",
        choices=["ours,saelens", "saelens,ours"],
        default="ours,saelens",
        metavar="{ours,saelens|saelens,ours}",
        help="which trainer runs first (they run back to back in this process)",
    )
    p.add_argument("--device", default="cpu", help="device for the LM and both SAEs")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep both runs' outputs (SAEs, metrics) here; default: a temp dir, deleted",
    )
    return p.parse_args(argv)


def compose_config(args: argparse.Namespace) -> Any:
    """Our training config exactly as `python -m saesweep.train` would compose it."""
    from hydra import compose, initialize_config_dir

    from saesweep.config.schema import validate

    overrides = [
        f"training.total_tokens={args.tokens}",
        f"training.batch_size={args.batch_size}",
        f"training.device={args.device}",
        f"sae.k={args.k}",
        f"sae.expansion_factor={args.expansion_factor}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    typed = validate(cfg)
    if typed.sae.architecture != "batchtopk":
        raise SystemExit(
            f"conf/train.yaml's architecture is {typed.sae.architecture!r}; this benchmark needs batchtopk"
        )
    return typed


# --- machine info --------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def pkg_version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),  # left at torch's default on purpose
        "torch_version": torch.__version__,
        "sae_lens_version": pkg_version("sae-lens"),
        "transformer_lens_version": pkg_version("transformer-lens"),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --- evaluation: one code path for both SAEs ------------------------------------


class SAELensForEval(torch.nn.Module):
    """A SAELens inference SAE presented through the interface saesweep.evaluation.held_out reads
    (encode, decode, W_enc, d_sae, d_out), so both trainers' outputs are measured by
    the same code. Being an nn.Module gives it the train()/eval() that evaluate() toggles."""

    def __init__(self, sae: Any):
        super().__init__()
        self.sae = sae
        self.d_sae = sae.cfg.d_sae
        self.d_out = sae.cfg.d_in  # an SAE reconstructs its input

    @property
    def W_enc(self) -> torch.Tensor:
        return self.sae.W_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(acts)


def evaluate_saved_sae(path: Path, source: Any, eval_rows: torch.Tensor, cfg: Any, device: str) -> dict[str, Any]:
    """Load an SAE directory the way a user would (SAE.load_from_disk) and evaluate it."""
    from sae_lens import SAE

    from saesweep.evaluation.held_out import evaluate

    sae = SAE.load_from_disk(str(path), device=device)
    result = evaluate(SAELensForEval(sae), source, eval_rows, cfg.eval.rows, cfg.eval.ce_rows, cfg.eval.batch_rows)
    result["inference_architecture"] = sae.cfg.architecture()
    threshold = getattr(sae, "threshold", None)
    if threshold is not None:  # JumpReLU: BatchTopK's single threshold, broadcast per latent
        result["jumprelu_threshold"] = float(threshold.detach().float().mean())
    return result


# --- our trainer ----------------------------------------------------------------


def _timed_method(timings: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, adding its wall time to timings[name]; a plain function, so it binds as a method too."""

    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

    return wrapper


@contextlib.contextmanager
def instrumented_trainer(model: Any, rows: Any, timings: dict[str, float]) -> Iterator[None]:
    """Run saesweep.training.loop.train unchanged, except that it reuses the model and token
    rows already loaded here (SAELens gets the same objects, so neither side pays for
    loading) and that its evaluate() call is timed, to subtract it from the wall time."""
    import saesweep.training.loop as loop_mod
    import saesweep.training.member as member_mod
    from saesweep.sae.batchtopk import BatchTopKSAE

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return _timed_method(timings, name, fn)

    with (
        mock.patch.object(loop_mod, "load_model_checked", timed("load_model", lambda *a, **kw: model)),
        mock.patch.object(loop_mod, "load_token_rows", timed("load_token_rows", lambda *a, **kw: rows)),
        mock.patch.object(member_mod, "evaluate", timed("evaluate", member_mod.evaluate)),
        mock.patch.object(member_mod, "save_sae", timed("save_sae", member_mod.save_sae)),
        mock.patch.object(BatchTopKSAE, "calibrate", timed("calibrate", BatchTopKSAE.calibrate)),
    ):
        yield


def run_ours(cfg: Any, model: Any, rows: Any, source: Any, run_dir: Path, device: str) -> dict[str, Any]:
    from saesweep.training.loop import train

    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with instrumented_trainer(model, rows, timings):
        t0 = time.perf_counter()
        result = train(cfg, run_dir)
        total = time.perf_counter() - t0
    wall = total - timings.get("evaluate", 0.0)
    tokens = int(result["tokens_trained"])
    # The wall time outside the trainer's own timed span and the calls timed here
    # (e.g. the first buffer fill, if the trainer's span starts after it).
    timings["other"] = (
        wall
        - result["train_seconds"]
        - timings.get("calibrate", 0.0)
        - timings.get("save_sae", 0.0)
        - timings.get("load_model", 0.0)
        - timings.get("load_token_rows", 0.0)
    )
    log.info("ours: %d tokens, train() %.1f s (%.1f s without evaluation)", tokens, total, wall)

    evaluated = evaluate_saved_sae(run_dir / "sae", source, rows.eval_rows, cfg, device)
    return {
        "tokens": tokens,
        "trainer_seconds": result["train_seconds"],
        "trainer_tokens_per_second": result["tokens_per_second"],
        "wall_seconds": wall,
        "wall_tokens_per_second": tokens / wall,
        "train_call_seconds": total,
        "component_seconds": timings,
        **{k: evaluated[k] for k in ("l0", "explained_variance", "ce_loss_score", "dead_fraction", "mse")},
        "eval": evaluated,
        # The trainer's own evaluation of the in-memory SAE; should match `eval` to float precision.
        "trainer_eval": {k: result[k] for k in ("l0", "explained_variance", "ce_loss_score", "dead_fraction")},
    }


# --- SAELens --------------------------------------------------------------------


def activation_buffer_tokens(cfg: Any, source: Any, device: Any, tokens: int) -> int:
    """Our trainer's buffer size: buffer.size_tokens (or what `auto` makes of the device's free
    memory, as saesweep.training.loop asks for it), capped at the run length (65,536 tokens
    either way at the default 1M)."""
    from saesweep.training.buffer_size import buffer_capacity

    batch = cfg.training.batch_size
    size = buffer_capacity([cfg], source.widths(), torch.device(device), batch, tokens)
    return max(2 * batch, min(size, tokens))


def saelens_dataset(rows: Any, n_rows: int) -> Any:
    """The first n_rows of our training stream (our shuffled order; never the held-out
    rows) as a pre-tokenized HF dataset, which SAELens reads in order."""
    import datasets

    take = torch.stack(list(itertools.islice(rows.train_iter(), n_rows)))
    return datasets.Dataset.from_dict({"input_ids": take.tolist()})


def run_saelens(
    cfg: Any, model: Any, rows: Any, source: Any, out_dir: Path, tokens: int, device: str
) -> dict[str, Any]:
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
    )
    from sae_lens.training.activation_scaler import ActivationScaler

    from saesweep.evaluation.held_out import reconstruction_metrics
    from saesweep.training.loop import seed_everything

    ctx = cfg.dataset.context_size
    batch = cfg.training.batch_size
    d_in = source.d_in
    d_sae = cfg.sae.width(d_in)
    # SAELens's buffer is n_batches_in_buffer x context_size tokens (activations_store.py,
    # get_data_loader); size it like ours. It also refills by keeping half
    # (activations_mixing_fraction=0.5), as ours does.
    buffer_tokens = activation_buffer_tokens(cfg, source, device, tokens)
    n_batches_in_buffer = max(1, buffer_tokens // ctx)
    # Our scaling factor comes from the first buffer; give SAELens as many tokens for its
    # estimate instead of its default 1000 batches (4M tokens of LM forward).
    n_norm_batches = max(1, buffer_tokens // batch)
    bos = model.tokenizer.bos_token_id
    bos_excluded = cfg.activations.exclude_bos and bos is not None

    # Enough rows for the norm estimate, training and the buffer left unread at the end;
    # with BOS dropped a row gives at most context_size - 1 tokens.
    per_row = ctx - 1 if bos_excluded else ctx
    needed = n_norm_batches * batch + tokens + buffer_tokens
    n_rows = math.ceil(needed / per_row) + 2 * cfg.activations.batch_rows
    dataset = saelens_dataset(rows, n_rows)

    work = out_dir / "saelens"
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=BatchTopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            k=cfg.sae.k,
            dtype="float32",
            device=device,
            apply_b_dec_to_input=cfg.sae.apply_b_dec_to_input,
            # Ours scales inputs to mean norm sqrt(d_in) (conf/architecture/batchtopk.yaml);
            # without it the same lr would mean a different step size. Folded in at save.
            normalize_activations=cfg.sae.normalize_activations,
            # Everything else (aux-k loss, rescale_acts_by_decoder_norm, decoder init,
            # threshold rate) stays at SAELens's BatchTopK defaults, as a user would get.
        ),
        model_name=f"{cfg.model.name} (saesweep's HookedTransformer, via override_model)",
        hook_name=cfg.model.hook_point,
        dataset_path=f"{cfg.dataset.path} (saesweep training rows, via override_dataset)",
        streaming=False,
        is_dataset_tokenized=True,
        context_size=ctx,
        prepend_bos=cfg.dataset.prepend_bos,  # rows already start with BOS; only recorded
        n_batches_in_buffer=n_batches_in_buffer,
        training_tokens=tokens,
        store_batch_size_prompts=cfg.activations.batch_rows,
        train_batch_size_tokens=batch,
        n_batches_for_norm_estimate=n_norm_batches,
        # Drop exactly the BOS token, like ours; True would drop every special id the
        # tokenizer names (SmolLM2: BOS 1 and EOS/PAD 2).
        exclude_special_tokens=[bos] if bos_excluded else False,
        device=device,
        dtype="float32",
        seed=cfg.training.seed,  # recorded only: SAELens never reads it (see seed_everything below)
        lr=cfg.optimizer.lr,
        adam_beta1=cfg.optimizer.betas[0],
        adam_beta2=cfg.optimizer.betas[1],
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        output_path=str(work),
        verbose=False,
    )

    # LanguageModelSAERunnerConfig.seed is not applied anywhere in SAELens's runner or
    # trainer, so seed torch's global RNG (SAE init, buffer shuffles) ourselves.
    seed_everything(cfg.training.seed)
    t0 = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model)
    construct = time.perf_counter() - t0

    # run() installs SIGINT/SIGTERM handlers that raise its InterruptedException and
    # never restores them; put ours back so the other run is interruptible as usual.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Components of run(), timed without changing them. The norm estimate's first call
    # also fills the activation buffer (LM forward) that training then draws from.
    components: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        with (
            mock.patch.object(
                ActivationScaler,
                "estimate_scaling_factor",
                _timed_method(components, "norm_estimate", ActivationScaler.estimate_scaling_factor),
            ),
            mock.patch.object(
                LanguageModelSAETrainingRunner,
                "save_final_sae",
                _timed_method(components, "save_final_sae", LanguageModelSAETrainingRunner.save_final_sae),
            ),
        ):
            trained = runner.run()
    finally:
        wall = time.perf_counter() - t0
        for s, h in handlers.items():
            signal.signal(s, h)
    log.info("saelens: %d tokens, run() %.1f s", tokens, wall)

    evaluated = evaluate_saved_sae(work, source, rows.eval_rows, cfg, device)
    # Also the SAE as trained (BatchTopK over each eval chunk of eval.batch_rows rows,
    # not the exported JumpReLU threshold): separates training quality from the
    # threshold SAELens exports. Reconstruction only (no CE) to keep it cheap.
    trained.eval()
    training_form = reconstruction_metrics(
        SAELensForEval(trained), source, rows.eval_rows[: cfg.eval.rows], cfg.eval.batch_rows
    )
    return {
        "tokens": tokens,
        "wall_seconds": wall,
        "wall_tokens_per_second": tokens / wall,
        "runner_construct_seconds": construct,
        "component_seconds": components,
        **{k: evaluated[k] for k in ("l0", "explained_variance", "ce_loss_score", "dead_fraction", "mse")},
        "eval": evaluated,
        # SAELens's own end-of-training record: mean L0 of the *training* BatchTopK
        # activation over its last sparsity window (not the exported JumpReLU's L0).
        "training_metadata_l0": getattr(trained.cfg.metadata, "l0", None),
        "eval_training_form_batchtopk": training_form,
        "settings": {
            "n_batches_in_buffer": n_batches_in_buffer,
            "buffer_tokens": n_batches_in_buffer * ctx,
            "training_tokens": tokens,
            "n_batches_for_norm_estimate": n_norm_batches,
            "exclude_special_tokens": [bos] if bos_excluded else False,
            "dataset_rows": n_rows,
            "aux_loss_coefficient": runner_cfg.sae.aux_loss_coefficient,
            "rescale_acts_by_decoder_norm": runner_cfg.sae.rescale_acts_by_decoder_norm,
            "decoder_init_norm": runner_cfg.sae.decoder_init_norm,
            "topk_threshold_lr": runner_cfg.sae.topk_threshold_lr,
            "dead_feature_window_steps": runner_cfg.dead_feature_window,
        },
    }


# --- output ---------------------------------------------------------------------


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    ours, theirs = results["ours"], results["saelens"]
    trained_form = theirs["eval_training_form_batchtopk"]
    rows = [
        ("tokens trained", fmt(ours["tokens"], ","), fmt(theirs["tokens"], ",")),
        ("wall seconds (see notes)", fmt(ours["wall_seconds"], ".1f"), fmt(theirs["wall_seconds"], ".1f")),
        (
            "**tokens/s, wall (see notes)**",
            fmt(ours["wall_tokens_per_second"], ",.0f"),
            fmt(theirs["wall_tokens_per_second"], ",.0f"),
        ),
        ("tokens/s, saesweep trainer's own figure (eval.json)", fmt(ours["trainer_tokens_per_second"], ",.0f"), "-"),
        ("L0 (held-out, exported JumpReLU SAE)", fmt(ours["l0"], ".2f"), fmt(theirs["l0"], ".2f")),
        ("explained variance", fmt(ours["explained_variance"], ".4f"), fmt(theirs["explained_variance"], ".4f")),
        ("CE loss score", fmt(ours["ce_loss_score"], ".4f"), fmt(theirs["ce_loss_score"], ".4f")),
        ("dead fraction (over eval tokens)", fmt(ours["dead_fraction"], ".4f"), fmt(theirs["dead_fraction"], ".4f")),
        (
            "JumpReLU threshold",
            fmt(ours["eval"].get("jumprelu_threshold"), ".4g"),
            fmt(theirs["eval"].get("jumprelu_threshold"), ".4g"),
        ),
        (
            "SAELens as trained (BatchTopK form): L0 / EV",
            "-",
            f"{trained_form['l0']:.2f} / {trained_form['explained_variance']:.4f}",
        ),
        (
            "1-min load average before / after",
            "{before:.2f} / {after:.2f}".format(**ours["load_average_1min"]),
            "{before:.2f} / {after:.2f}".format(**theirs["load_average_1min"]),
        ),
    ]
    table = "\n".join(["| | saesweep | SAELens |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])
    r = results["ratios"]
    oc, tc = ours["component_seconds"], theirs["component_seconds"]
    saelens_rest = theirs["wall_seconds"] - tc.get("norm_estimate", 0.0) - tc.get("save_final_sae", 0.0)
    breakdown = (
        f"saesweep {ours['wall_seconds']:.1f} = trainer's timed span {ours['trainer_seconds']:.1f} "
        f"+ threshold calibration {oc.get('calibrate', 0.0):.1f} + save {oc.get('save_sae', 0.0):.1f} "
        f"+ other {oc.get('other', 0.0):.1f}; SAELens {theirs['wall_seconds']:.1f} = norm estimate "
        f"(its first call fills the buffer) {tc.get('norm_estimate', 0.0):.1f} "
        f"+ training loop and folding {saelens_rest:.1f} + save {tc.get('save_final_sae', 0.0):.1f}"
    )
    return f"""# saesweep vs SAELens: BatchTopK training

Generated by `benchmarks/bench_vs_saelens.py` on {m["date"]}.

**Machine:** {m["cpu_model"]}, {m["cpu_count"]} cores (torch threads: {m["torch_num_threads"]}), \
torch {m["torch_version"]}, sae-lens {m["sae_lens_version"]}, transformer-lens {m["transformer_lens_version"]}, \
Python {m["python_version"]}, device `{s["device"]}`.

**Setup:** {s["model"]} at `{s["hook"]}`, BatchTopK k={s["k"]}, d_sae={s["d_sae"]} \
(expansion {s["expansion_factor"]} x {s["d_in"]}), {s["batch_size"]} tokens/step, {s["tokens"]:,} tokens \
({s["tokens_requested"]:,} requested, rounded down to whole steps), context {s["context_size"]}, \
LM batches of {s["lm_batch_rows"]} rows, Adam lr {s["lr"]} betas {tuple(s["betas"])}, constant lr, \
grad-norm clip 1.0 (both), input normalization `{s["normalize_activations"]}` (both), \
activation buffer {s["buffer_tokens"]:,} tokens (both), BOS excluded: {s["bos_excluded"]}, seed {s["seed"]}. \
Run order: {s["order"]}, back to back in one process.

{table}

**Speed ratio saesweep / SAELens, tokens/s wall vs wall: {r["wall_tokens_per_second"]:.2f}x** \
(saesweep trainer's own figure vs SAELens wall: {r["trainer_vs_saelens_wall_tokens_per_second"]:.2f}x).

Notes:
- *saesweep wall* = the whole `train()` call minus its `evaluate()`: first buffer fill (LM forward), \
training loop, threshold calibration, writing the SAE. *Trainer's own figure* is eval.json's \
`tokens_per_second`, over the span `saesweep.training.loop` times itself.
- *SAELens wall* = its whole `runner.run()`: {theirs["settings"]["n_batches_for_norm_estimate"]} \
norm-estimate batches (LM forward, not trained on), training loop (LM forward included), weight folding, \
writing the SAE.
- Time breakdown (s): {breakdown}.
- The model and token rows are loaded once and shared, so neither figure includes loading them. \
SAELens trains on our training rows, in our first-epoch order (never the held-out rows).
- Both SAEs are loaded from disk with `sae_lens.SAE.load_from_disk` (JumpReLU inference form) and \
evaluated by `saesweep.evaluation.held_out.evaluate` on the same {s["eval_rows"]} held-out rows (CE on the first \
{s["ce_rows"]}); EV is accumulated in float64 over all eval tokens with BOS excluded. Dead fraction = \
latents that never fire on those eval tokens.
- SAELens keeps its BatchTopK defaults besides the shared settings (aux-k loss coefficient \
{theirs["settings"]["aux_loss_coefficient"]}, rescale_acts_by_decoder_norm \
{theirs["settings"]["rescale_acts_by_decoder_norm"]}, decoder init norm \
{theirs["settings"]["decoder_init_norm"]}, threshold EMA rate {theirs["settings"]["topk_threshold_lr"]}). \
Its exported threshold is an EMA that starts at 0 with no bias correction, so after a short run it is \
too low and the exported SAE's L0 is far above k; the "as trained" row shows the same weights with the \
BatchTopK activation over each eval chunk. Its `seed` setting is not applied by SAELens; the benchmark \
seeds torch's global RNG itself before building the runner.
- Load averages well above the torch thread count mean another process competed for the CPU and \
the timings are not trustworthy.
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from saesweep.activations.source import ActivationSource
    from saesweep.data.rows import load_token_rows
    from saesweep.lm.model import load_model
    from saesweep.training.distributed import resolve_device

    cfg = compose_config(args)
    device = resolve_device(cfg.training.device, "training.device")
    tokens = (cfg.training.total_tokens // cfg.training.batch_size) * cfg.training.batch_size

    # One model and one set of rows for everything: both trainers and both evaluations.
    model = load_model(cfg.model, device, cfg.cache_dir)
    rows = load_token_rows(cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.training.seed)
    source = ActivationSource(model, cfg.model.hook_point, cfg.model.hook_point_out, cfg.activations.exclude_bos)

    settings = {
        "model": cfg.model.name,
        "hook": cfg.model.hook_point,
        "d_in": source.d_in,
        "d_sae": cfg.sae.width(source.d_in),
        "k": cfg.sae.k,
        "expansion_factor": cfg.sae.expansion_factor,
        "batch_size": cfg.training.batch_size,
        "tokens_requested": args.tokens,
        "tokens": tokens,
        "context_size": cfg.dataset.context_size,
        "lr": cfg.optimizer.lr,
        "betas": list(cfg.optimizer.betas),
        "buffer_tokens": activation_buffer_tokens(cfg, source, device, tokens),
        "lm_batch_rows": cfg.activations.batch_rows,
        "bos_excluded": cfg.activations.exclude_bos,
        "normalize_activations": cfg.sae.normalize_activations,
        "seed": cfg.training.seed,
        "device": str(device),
        "order": args.order,
        "eval_rows": min(cfg.eval.rows, len(rows.eval_rows)),
        "ce_rows": min(cfg.eval.ce_rows, len(rows.eval_rows)),
    }
    log.info("settings: %s", settings)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_vs_saelens."))
    work.mkdir(parents=True, exist_ok=True)
    runs = {
        "ours": lambda: run_ours(cfg, model, rows, source, work / "ours", str(device)),
        "saelens": lambda: run_saelens(cfg, model, rows, source, work, tokens, str(device)),
    }
    results: dict[str, Any] = {"machine": machine_info(), "settings": settings}
    try:
        for name in args.order.split(","):
            log.info("=== training %s ===", name)
            # 1-minute load averages around each run: on a shared box, a load well above
            # the torch thread count means the timings were contended and are not comparable.
            before = os.getloadavg()[0]
            results[name] = runs[name]()
            results[name]["load_average_1min"] = {"before": before, "after": os.getloadavg()[0]}
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    ours, theirs = results["ours"], results["saelens"]
    results["ratios"] = {
        "wall_tokens_per_second": ours["wall_tokens_per_second"] / theirs["wall_tokens_per_second"],
        "trainer_vs_saelens_wall_tokens_per_second": ours["trainer_tokens_per_second"]
        / theirs["wall_tokens_per_second"],
    }

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown(results))
    log.info("wrote %s and %s", out, md)
    print(md.read_text())


if __name__ == "__main__":
    sys.exit(main())
