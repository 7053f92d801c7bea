"""The training loop: one loop for every architecture.

The SAE returns a dict of named loss terms; the loop sums them, steps the
optimizer, logs, and at the end evaluates on held-out rows and exports.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from saesweep.activations import ActivationSource
from saesweep.buffer import ActivationBuffer
from saesweep.config import TrainConfig
from saesweep.data import load_token_rows
from saesweep.errors import UserError
from saesweep.evals import evaluate
from saesweep.export import atomic_write_text, save_sae
from saesweep.metrics import explained_variance
from saesweep.models import check_hook, load_model
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


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    seed_everything(cfg.training.seed)
    device = resolve_device(cfg.training.device)

    model = load_model(cfg.model, device, cfg.cache_dir)
    check_hook(model, cfg.model.hook_point, "model.hook_point")
    if cfg.model.hook_point_out is not None:
        check_hook(model, cfg.model.hook_point_out, "model.hook_point_out")
    if cfg.dataset.context_size > model.cfg.n_ctx:
        raise UserError(
            f"config key 'dataset.context_size': {cfg.dataset.context_size} exceeds the model's n_ctx {model.cfg.n_ctx}"
        )
    rows = load_token_rows(cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.training.seed)
    source = ActivationSource(model, cfg.model.hook_point, cfg.model.hook_point_out, cfg.activations.exclude_bos)
    buffer = ActivationBuffer(
        source.batches(rows.train_iter(), cfg.activations.batch_rows),
        capacity=cfg.buffer.size_tokens,
        batch_size=cfg.training.batch_size,
        device=device,
        generator=torch.Generator().manual_seed(cfg.training.seed),
    )

    sae = build_sae(cfg.sae, source.d_in, source.d_out).to(device)
    first = buffer.sample()
    sae.fit_to_data(first[0], first[-1])
    optimizer = build_optimizer(sae.parameters(), cfg.optimizer)
    total_steps = cfg.training.total_tokens // cfg.training.batch_size
    scheduler = build_scheduler(optimizer, total_steps, cfg.scheduler)
    log.info("training %s: d_in=%d d_sae=%d for %d steps of %d tokens on %s",
             cfg.sae.architecture, sae.d_in, sae.d_sae, total_steps, cfg.training.batch_size, device)

    tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    metrics_file = open(run_dir / "metrics.jsonl", "a")
    progress = tqdm(range(total_steps), desc="train", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    sae.train()
    for step in progress:
        batch = buffer.next_batch()
        x, target = batch[0], batch[-1]
        out = sae(x, target, step)
        loss = sum(out.losses.values())

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.training.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.training.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        sae.after_step()

        tokens_since_fired = torch.where(out.fired, 0, tokens_since_fired + len(x))

        if (step + 1) % cfg.training.log_every == 0 or step + 1 == total_steps:
            tokens = (step + 1) * cfg.training.batch_size
            record = {
                "step": step + 1,
                "tokens": tokens,
                "lr": scheduler.get_last_lr()[0],
                "loss": float(loss.detach()),
                **{f"loss/{k}": float(v.detach()) for k, v in out.losses.items()},
                "l0": float(out.l0),
                "explained_variance": explained_variance(target, out.recon.detach()),
                "dead_features": int((tokens_since_fired >= cfg.training.dead_after_tokens).sum()),
                "tokens_per_second": tokens / (time.perf_counter() - start),
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            progress.set_postfix(
                tok_s=f"{record['tokens_per_second']:.0f}",
                L0=f"{record['l0']:.1f}",
                EV=f"{record['explained_variance']:.3f}",
            )
    elapsed = time.perf_counter() - start
    metrics_file.close()
    progress.close()

    sae.calibrate(buffer.sample()[0])
    tokens_trained = total_steps * cfg.training.batch_size
    log.info("trained on %d tokens in %.1f s; evaluating on held-out rows", tokens_trained, elapsed)
    result = evaluate(sae, source, rows.eval_rows, cfg.eval.rows, cfg.eval.ce_rows, cfg.eval.batch_rows)
    result.update(
        tokens_trained=tokens_trained,
        train_seconds=elapsed,
        tokens_per_second=tokens_trained / elapsed,
        bos_excluded=cfg.activations.exclude_bos,
    )
    save_sae(sae, run_dir / "sae", sae_metadata(cfg))
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    return result


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
