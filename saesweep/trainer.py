"""The training loop: one loop for every architecture.

The SAE returns a dict of named loss terms; the loop sums them, steps the
optimizer, logs, and at the end evaluates on held-out rows and exports.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from saesweep.activations import ActivationSource
from saesweep.buffer import ActivationBuffer
from saesweep.cache import open_training_feed
from saesweep.checkpoint import CHECKPOINT_NAME, StopSignals, config_differences, load_checkpoint, save_checkpoint
from saesweep.config import TrainConfig
from saesweep.data import load_token_rows
from saesweep.errors import UserError
from saesweep.evals import evaluate
from saesweep.atomic import atomic_write, atomic_write_text
from saesweep.export import save_sae
from saesweep.metrics import explained_variance
from saesweep.metrics_log import MetricsLog
from saesweep.models import check_hook, hook_layer, load_model
from saesweep.optim import build_optimizer, build_scheduler
from saesweep.sae import build_sae

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key 'training.device': {name!r} but no CUDA GPU is visible; use auto or cpu")
    return torch.device(name)


# Keys that may change between an interrupted run and its resumption.
RESUME_MAY_CHANGE = {"training.resume", "training.checkpoint_every_tokens", "training.log_every",
                     "training.device", "training.max_nonfinite_steps", "eval", "cache_dir", "logger", "objectives",
                     "activations.cache_dir", "activations.shard_mb"}


def resumable_config(cfg: TrainConfig) -> dict[str, Any]:
    flat = asdict(cfg)
    for key in RESUME_MAY_CHANGE:
        section, _, name = key.partition(".")
        if name:
            flat[section].pop(name, None)
        else:
            flat.pop(section, None)
    return flat


def load_model_checked(cfg: TrainConfig, device: torch.device) -> Any:
    model = load_model(cfg.model, device, cfg.cache_dir)
    check_hook(model, cfg.model.hook_point, "model.hook_point")
    if cfg.model.hook_point_out is not None:
        check_hook(model, cfg.model.hook_point_out, "model.hook_point_out")
        layer_in, layer_out = hook_layer(cfg.model.hook_point), hook_layer(cfg.model.hook_point_out)
        if layer_in is not None and layer_out is not None and layer_out < layer_in:
            raise UserError(
                f"config key 'model.hook_point_out': {cfg.model.hook_point_out} comes before the input hook "
                f"{cfg.model.hook_point}; a transcoder maps an earlier hook to a later one"
            )
    if cfg.dataset.context_size > model.cfg.n_ctx:
        raise UserError(
            f"config key 'dataset.context_size': {cfg.dataset.context_size} exceeds the model's n_ctx {model.cfg.n_ctx}"
        )
    return model


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if cfg.training.resume != "never" and (run_dir / "eval.json").exists():
        log.info("%s has finished already (eval.json); nothing to do", run_dir)
        return json.loads((run_dir / "eval.json").read_text())
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME) if cfg.training.resume != "never" else None
    if checkpoint is not None and cfg.training.resume != "force":
        changed = config_differences(checkpoint["config"], resumable_config(cfg))
        if changed:
            raise UserError(
                f"run dir {run_dir} holds a checkpoint of a different config: {'; '.join(changed)}. "
                "Use a new run dir, or training.resume=force to continue anyway"
            )

    seed_everything(cfg.training.seed)
    device = resolve_device(cfg.training.device)
    model = load_model_checked(cfg, device)
    rows = load_token_rows(cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.training.seed)
    source = ActivationSource(model, cfg.model.hook_point, cfg.model.hook_point_out, cfg.activations.exclude_bos)
    # Live LM pass or the shared cache; either way the buffer gets chunks of activations.
    feed = open_training_feed(cfg, model, source, rows, checkpoint)
    # A buffer larger than the run would compute activations nobody trains on.
    capacity = max(2 * cfg.training.batch_size, min(cfg.buffer.size_tokens, cfg.training.total_tokens))
    buffer = ActivationBuffer(
        feed,
        capacity=capacity,
        batch_size=cfg.training.batch_size,
        device=device,
        generator=torch.Generator().manual_seed(cfg.training.seed),
    )
    transcoder = cfg.model.hook_point_out not in (None, cfg.model.hook_point)
    sae = build_sae(cfg.sae, source.d_in, source.d_out, transcoder).to(device)
    optimizer = build_optimizer(sae.param_groups(), cfg.optimizer)
    total_steps = cfg.training.total_tokens // cfg.training.batch_size
    scheduler = build_scheduler(optimizer, total_steps, cfg.scheduler)
    tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)

    segment_start = time.perf_counter()  # throughput counts every LM pass, the first fill included
    if checkpoint is None:
        step, elapsed_before = 0, 0.0
        truncate_metrics(run_dir / "metrics.jsonl", 0)  # lines of a run killed before its first checkpoint
        first = buffer.sample()
        sae.fit_to_data(first[0], first[-1])
    else:
        step, elapsed_before = checkpoint["step"], checkpoint["elapsed"]
        sae.load_state_dict(checkpoint["sae"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        buffer.load_state_dict(checkpoint["buffer"])
        tokens_since_fired.copy_(checkpoint["tokens_since_fired"])
        torch.set_rng_state(checkpoint["torch_rng"])
        truncate_metrics(run_dir / "metrics.jsonl", step)
        log.info("resuming %s from step %d of %d", run_dir, step, total_steps)

    # Fault injection for the crash tests: SAESWEEP_CRASH_AT_STEP=N is a SIGKILL after step N
    # (and its checkpoint, if one is due); N:checkpoint kills half-way through writing it.
    crash_step, _, crash_where = os.environ.get("SAESWEEP_CRASH_AT_STEP", "0").partition(":")
    crash_at = int(crash_step)

    def save_state() -> None:
        state = {
            "config": resumable_config(cfg),
            "step": step,
            "elapsed": elapsed_before + time.perf_counter() - segment_start,
            **feed.state_dict(),  # the data position: rows consumed, or the cache read position
            "sae": sae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "buffer": buffer.state_dict(),
            "tokens_since_fired": tokens_since_fired,
            "torch_rng": torch.get_rng_state(),
        }
        if step == crash_at and crash_where == "checkpoint":
            atomic_write(run_dir / CHECKPOINT_NAME, lambda tmp: _die_mid_write(state, tmp))
        save_checkpoint(run_dir / CHECKPOINT_NAME, state)

    log.info("training %s: d_in=%d d_sae=%d for %d steps of %d tokens on %s",
             cfg.sae.architecture, sae.d_in, sae.d_sae, total_steps, cfg.training.batch_size, device)
    batch_size, every = cfg.training.batch_size, cfg.training.checkpoint_every_tokens
    metrics = MetricsLog(run_dir, cfg.logger, cfg)
    sae.train()
    nonfinite = 0  # consecutive skipped steps
    # The bar is closed however the loop ends, so an error message starts on its own line.
    with StopSignals() as stop, tqdm(total=total_steps, initial=step, desc="train", unit="step",
                                     dynamic_ncols=True) as progress:
        while step < total_steps:
            batch = buffer.next_batch()
            x, target = batch[0], batch[-1]
            out = sae(x, target, step)
            loss = sum(out.losses.values())

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # With no clipping the max norm is inf: the gradients stay as they are, but we
            # still get their norm for the finiteness check below.
            grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.training.grad_clip_norm or float("inf"))
            # One host sync per step: a NaN/Inf step would poison Adam's moments for good.
            if not torch.isfinite(loss.detach() + grad_norm):
                nonfinite += 1
                log.warning("step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row)",
                            step, float(loss.detach()), float(grad_norm), nonfinite)
                if nonfinite >= cfg.training.max_nonfinite_steps:
                    save_state()  # the state is the last good one: bad steps were never applied
                    raise UserError(
                        f"training diverged: {nonfinite} steps in a row had a non-finite loss or gradient "
                        f"(at step {step}); the last good state is in {run_dir / CHECKPOINT_NAME}. Lower "
                        "optimizer.lr or set training.grad_clip_norm, then rerun with training.resume=force"
                    )
                continue
            nonfinite = 0
            optimizer.step()
            scheduler.step()
            sae.after_step()
            tokens_since_fired = torch.where(out.fired, 0, tokens_since_fired + len(x))
            step += 1
            progress.update()

            if step % cfg.training.log_every == 0 or step == total_steps:
                tokens = step * batch_size
                record = {
                    "step": step,
                    "tokens": tokens,
                    "lr": scheduler.get_last_lr()[0],
                    "loss": float(loss.detach()),
                    **{f"loss/{k}": float(v.detach()) for k, v in out.losses.items()},
                    "l0": float(out.l0),
                    "explained_variance": explained_variance(target, out.recon.detach()),
                    "dead_features": int((tokens_since_fired >= cfg.training.dead_after_tokens).sum()),
                    "tokens_per_second": tokens / (elapsed_before + time.perf_counter() - segment_start),
                }
                metrics.log(record)
                progress.set_postfix(
                    tok_s=f"{record['tokens_per_second']:.0f}",
                    L0=f"{record['l0']:.1f}",
                    EV=f"{record['explained_variance']:.3f}",
                )
            crossed = every > 0 and (step * batch_size) // every > ((step - 1) * batch_size) // every
            if crossed or stop.received or step == total_steps:
                save_state()
            if step == crash_at and not crash_where:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop.received:
                if stop.received == signal.SIGINT:
                    # Ctrl-C is a person who wants to look at what they have; a preempted
                    # job (USR2/TERM) has seconds left and only needs the checkpoint.
                    sae.calibrate(buffer.sample()[0])
                    save_sae(sae, run_dir / "sae", {**sae_metadata(cfg), "partial": True,
                                                    "tokens_trained": step * batch_size})
                log.warning("stopping on signal %d at step %d; checkpoint saved%s. To resume, rerun the "
                            "same command with hydra.run.dir=%s", stop.received, step,
                            " and the SAE so far in sae/" if stop.received == signal.SIGINT else "", run_dir)
                stop.resend()
    elapsed = elapsed_before + time.perf_counter() - segment_start

    sae.calibrate(buffer.sample()[0])
    tokens_trained = total_steps * batch_size
    log.info("trained on %d tokens in %.1f s; evaluating on held-out rows", tokens_trained, elapsed)
    result = evaluate(sae, source, rows.eval_rows, cfg.eval.rows, cfg.eval.ce_rows, cfg.eval.batch_rows)
    result.update(
        tokens_trained=tokens_trained,
        train_seconds=elapsed,
        tokens_per_second=tokens_trained / elapsed,
        bos_excluded=cfg.activations.exclude_bos,
        activation_source=feed.name,
    )
    metrics.final(result)
    metrics.close()
    save_sae(sae, run_dir / "sae", sae_metadata(cfg), sparsity=result.log10_firing_rate())
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    # eval.json now marks the run finished; the checkpoint (buffer included) is dead weight.
    (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    return result


def _die_mid_write(state: dict[str, Any], tmp: Path) -> None:
    torch.save(state, tmp)
    os.truncate(tmp, tmp.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from; they will be logged again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def sae_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """What SAELens keeps in cfg.json's metadata, so users can find the activations again."""
    return {
        "model_name": cfg.model.name,
        "hook_name": cfg.model.hook_point,
        "hook_name_out": cfg.model.hook_point_out,
        "hook_head_index": None,
        "context_size": cfg.dataset.context_size,
        "prepend_bos": cfg.dataset.prepend_bos,
        "exclude_bos": cfg.activations.exclude_bos,
        "dataset_path": cfg.dataset.path,
        "model_from_pretrained_kwargs": dict(cfg.model.from_pretrained_kwargs),
        "seqpos_slice": [None],
    }
