"""Final evaluation on held-out rows: reconstruction metrics and the CE loss score.

CE is measured with the SAE's reconstruction spliced into the hook at every
position but BOS (clean, spliced, and zero-ablated), over full LM passes.
For a transcoder the splice replaces the output hook with the transcoder's
prediction from the input hook.

`evaluate` also counts, per latent, the eval tokens it fired on: that gives
SAELens's `sparsity.safetensors` and the density histogram of `saesweep.evaluate`.
Attention-head hooks ([..., n_heads, d_head]) are flattened to one vector per token,
as SAELens does for hook_z SAEs.

Much of an evaluation does not depend on the SAE: the held-out activations at the
hook, and the clean and zero-ablated CE losses (two of the three LM passes). Given a
`shared` key, `evaluate` keeps them for the next evaluation with the same key in this
process, so the members of a sweep (a grouped job, or Hydra's basic launcher running
members one after another) compute them once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch

from saesweep.activations.source import ActivationSource
from saesweep.evaluation.metrics import ReconstructionStats, ce_loss_score
from saesweep.sae import SAE
from saesweep.sae_format.read import log10_firing_rate


class EvalResult(dict):
    """eval.json's metrics (a plain dict to JSON), plus per-latent firing counts.

    `fire_counts[i]` is the number of eval tokens on which latent i was non-zero,
    out of `self["dead_window_tokens"]`.
    """

    fire_counts: torch.Tensor

    def firing_rate(self) -> torch.Tensor:
        return self.fire_counts.double() / max(int(self["dead_window_tokens"]), 1)

    def log10_firing_rate(self) -> torch.Tensor:
        """What SAELens keeps in sparsity.safetensors (never-fired latents at -10)."""
        return log10_firing_rate(self.fire_counts, int(self["dead_window_tokens"]))


T = TypeVar("T")
# The last evaluation's SAE-independent parts, by kind: (key, value). One entry per kind
# bounds the memory (the held-out activations of 640 rows of SmolLM2 are ~180 MB).
_SHARED: dict[str, tuple[Any, Any]] = {}


def shared_key(model_cfg: Any, hooks: list[str], token_filter: Any, rows: torch.Tensor, batch_rows: int) -> str:
    """What the SAE-independent parts of an evaluation depend on: the model as configured
    (within one process, one config loads the same weights), hooks, the positions kept
    (ActivationSource.filter), rows."""
    rows_sha = hashlib.sha256(rows.contiguous().cpu().numpy().tobytes()).hexdigest()
    parts = {
        "model": asdict(model_cfg),
        "hooks": hooks,
        "token_filter": token_filter,
        "rows": rows_sha,
        "batch_rows": batch_rows,
    }
    return json.dumps(parts, sort_keys=True, default=str)


def _reuse(kind: str, key: Optional[str], compute: Callable[[], T]) -> T:
    if key is None:
        return compute()
    cached = _SHARED.get(kind)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        _SHARED[kind] = cached
    return cached[1]


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, source: ActivationSource, rows: torch.Tensor, batch_rows: int, shared: Optional[str] = None
) -> EvalResult:
    device = sae.W_enc.device
    stats = ReconstructionStats(sae.d_out, sae.d_sae, device)
    fire_counts = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    chunks: Iterable = _reuse(
        "activations", shared and f"{shared}|{len(rows)}", lambda: list(source.batches(rows, batch_rows))
    )
    for chunk in chunks:
        x = chunk[0].to(device, torch.float32).flatten(1)
        y = chunk[-1].to(device, torch.float32).flatten(1)
        acts = sae.encode(x)
        stats.update(y, sae.decode(acts), acts)
        fire_counts += (acts != 0).sum(0)
    result = EvalResult(stats.result())
    result.fire_counts = fire_counts.cpu()
    return result


@torch.no_grad()
def ce_metrics(
    sae: SAE, source: ActivationSource, rows: torch.Tensor, batch_rows: int, shared: Optional[str] = None
) -> dict[str, float]:
    model = source.model
    hook_in, hook_out = source.hooks[0], source.hooks[-1]
    transcoder = hook_out != hook_in
    device = sae.W_enc.device
    batches = [rows[i : i + batch_rows].to(model.cfg.device) for i in range(0, len(rows), batch_rows)]

    def untouched(tokens: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Positions the splice leaves as they are (BOS), shaped to broadcast over act."""
        keep = ~source.token_mask(tokens)
        return keep.view(*keep.shape[:2], *([1] * (act.ndim - 2)))

    def references() -> list[tuple[float, float, int]]:
        """Per batch, what does not depend on the SAE: clean and zero-ablated loss sums."""
        out = []
        for tokens in batches:

            def ablate(act: torch.Tensor, tokens: torch.Tensor = tokens) -> torch.Tensor:
                return torch.where(untouched(tokens, act), act, torch.zeros_like(act))

            clean = model.loss_with_hooks(tokens, [])
            ablated = model.loss_with_hooks(tokens, [(hook_out, ablate)])
            out.append((float(clean.double().sum()), float(ablated.double().sum()), clean.numel()))
        return out

    refs = _reuse("ce_reference", shared and f"{shared}|{len(rows)}", references)
    spliced_total = 0.0
    for tokens in batches:
        captured: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor) -> None:
            captured["in"] = act

        def splice(act: torch.Tensor, tokens: torch.Tensor = tokens) -> torch.Tensor:
            x = (captured["in"] if transcoder else act).to(device, torch.float32)
            recon = sae.decode(sae.encode(x.flatten(2))).to(act.dtype).to(act.device).view(act.shape)
            return torch.where(untouched(tokens, act), act, recon)

        hooks = ([(hook_in, grab)] if transcoder else []) + [(hook_out, splice)]
        spliced_total += float(model.loss_with_hooks(tokens, hooks).double().sum())
    count = sum(n for _, _, n in refs)
    ce = {
        "clean": sum(c for c, _, _ in refs) / count,
        "sae": spliced_total / count,
        "ablation": sum(a for _, a, _ in refs) / count,
    }
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_ablation": ce["ablation"],
        "ce_loss_score": ce_loss_score(ce["clean"], ce["sae"], ce["ablation"]),
        "ce_tokens": count,
    }


def evaluate(
    sae: SAE,
    source: ActivationSource,
    rows: torch.Tensor,
    n_rows: Optional[int],
    n_ce_rows: int,
    batch_rows: int,
    shared: Optional[str] = None,
) -> EvalResult:
    """Metrics for eval.json on the first n_rows held-out rows (None: all; CE on the first n_ce_rows).

    `shared` (see `shared_key`): keep and reuse the SAE-independent parts."""
    was_training = sae.training
    sae.eval()
    try:
        result = reconstruction_metrics(sae, source, rows[:n_rows], batch_rows, shared)
        if n_ce_rows > 0:
            result.update(ce_metrics(sae, source, rows[:n_ce_rows], batch_rows, shared))
    finally:
        sae.train(was_training)
    return result
