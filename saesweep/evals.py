"""Final evaluation on held-out rows: reconstruction metrics and the CE loss score.

CE is measured with the SAE's reconstruction spliced into the hook at every
position but BOS (clean, spliced, and zero-ablated), over full LM passes.
For a transcoder the splice replaces the output hook with the transcoder's
prediction from the input hook.

`evaluate` also counts, per latent, the eval tokens it fired on: that gives
SAELens's `sparsity.safetensors` and the density histogram of `saesweep.evaluate`.
Attention-head hooks ([..., n_heads, d_head]) are flattened to one vector per token,
as SAELens does for hook_z SAEs.
"""

from __future__ import annotations

import torch

from saesweep.activations import ActivationSource
from saesweep.metrics import ReconstructionStats, ce_loss_score
from saesweep.sae import SAE
from saesweep.sae_dir import log10_firing_rate


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


@torch.no_grad()
def reconstruction_metrics(sae: SAE, source: ActivationSource, rows: torch.Tensor, batch_rows: int) -> EvalResult:
    device = sae.W_enc.device
    stats = ReconstructionStats(sae.d_out, sae.d_sae, device)
    fire_counts = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    for chunk in source.batches(rows, batch_rows):
        x = chunk[0].to(device, torch.float32).flatten(1)
        y = chunk[-1].to(device, torch.float32).flatten(1)
        acts = sae.encode(x)
        stats.update(y, sae.decode(acts), acts)
        fire_counts += (acts != 0).sum(0)
    result = EvalResult(stats.result())
    result.fire_counts = fire_counts.cpu()
    return result


@torch.no_grad()
def ce_metrics(sae: SAE, source: ActivationSource, rows: torch.Tensor, batch_rows: int) -> dict[str, float]:
    model = source.model
    hook_in, hook_out = source.hooks[0], source.hooks[-1]
    transcoder = hook_out != hook_in
    device = sae.W_enc.device
    totals = {"clean": 0.0, "sae": 0.0, "ablation": 0.0}
    count = 0
    for start in range(0, len(rows), batch_rows):
        tokens = rows[start : start + batch_rows].to(model.cfg.device)
        keep = (~source.token_mask(tokens))[..., None]  # positions left untouched (BOS)
        captured: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor) -> None:
            captured["in"] = act

        def splice(act: torch.Tensor) -> torch.Tensor:
            x = (captured["in"] if transcoder else act).to(device, torch.float32)
            recon = sae.decode(sae.encode(x.flatten(2))).to(act.dtype).to(act.device).view(act.shape)
            mask = keep.view(*keep.shape[:2], *([1] * (act.ndim - 2)))
            return torch.where(mask, act, recon)

        def ablate(act: torch.Tensor) -> torch.Tensor:
            mask = keep.view(*keep.shape[:2], *([1] * (act.ndim - 2)))
            return torch.where(mask, act, torch.zeros_like(act))

        per_token = {
            "clean": model.loss_with_hooks(tokens, []),
            "sae": model.loss_with_hooks(tokens, ([(hook_in, grab)] if transcoder else []) + [(hook_out, splice)]),
            "ablation": model.loss_with_hooks(tokens, [(hook_out, ablate)]),
        }
        for name, value in per_token.items():
            totals[name] += float(value.double().sum())
        count += per_token["clean"].numel()
    ce = {name: total / count for name, total in totals.items()}
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_ablation": ce["ablation"],
        "ce_loss_score": ce_loss_score(ce["clean"], ce["sae"], ce["ablation"]),
        "ce_tokens": count,
    }


def evaluate(sae: SAE, source: ActivationSource, rows: torch.Tensor, n_rows: int, n_ce_rows: int, batch_rows: int) -> EvalResult:
    """Metrics for eval.json on the first n_rows held-out rows (CE on the first n_ce_rows)."""
    was_training = sae.training
    sae.eval()
    try:
        result = reconstruction_metrics(sae, source, rows[:n_rows], batch_rows)
        if n_ce_rows > 0:
            result.update(ce_metrics(sae, source, rows[:n_ce_rows], batch_rows))
    finally:
        sae.train(was_training)
    return result
