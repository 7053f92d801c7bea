"""Final evaluation on held-out rows: reconstruction metrics and the CE loss score.

CE is measured with the SAE's reconstruction spliced into the hook at every
position but BOS (clean, spliced, and zero-ablated), over full LM passes.
For a transcoder the splice replaces the output hook with the transcoder's
prediction from the input hook.
"""

from __future__ import annotations

from typing import Any

import torch

from saesweep.activations import ActivationSource
from saesweep.metrics import ReconstructionStats, ce_loss_score
from saesweep.sae import SAE


@torch.no_grad()
def reconstruction_metrics(sae: SAE, source: ActivationSource, rows: torch.Tensor, batch_rows: int) -> dict[str, float]:
    device = sae.W_enc.device
    stats = ReconstructionStats(sae.d_out, sae.d_sae, device)
    for chunk in source.batches(rows, batch_rows):
        x = chunk[0].to(device, torch.float32)
        y = chunk[-1].to(device, torch.float32)
        acts = sae.encode(x)
        stats.update(y, sae.decode(acts), acts)
    return stats.result()


@torch.no_grad()
def ce_metrics(sae: SAE, source: ActivationSource, rows: torch.Tensor, batch_rows: int) -> dict[str, float]:
    model = source.model
    hook_in, hook_out = source.hooks[0], source.hooks[-1]
    device = sae.W_enc.device
    totals = {"clean": 0.0, "sae": 0.0, "ablation": 0.0}
    count = 0
    for start in range(0, len(rows), batch_rows):
        tokens = rows[start : start + batch_rows].to(model.cfg.device)
        keep = (~source.token_mask(tokens))[..., None]  # positions left untouched (BOS)
        captured: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor, hook: Any) -> None:
            captured["in"] = act

        def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
            x = (captured["in"] if hook_out != hook_in else act).to(device, torch.float32)
            recon = sae.decode(sae.encode(x)).to(act.dtype).to(act.device)
            return torch.where(keep, act, recon)

        def ablate(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return torch.where(keep, act, torch.zeros_like(act))

        def loss(hooks: list) -> torch.Tensor:
            return model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=hooks)

        per_token = {
            "clean": loss([]),
            "sae": loss(([(hook_in, grab)] if hook_out != hook_in else []) + [(hook_out, splice)]),
            "ablation": loss([(hook_out, ablate)]),
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


def evaluate(sae: SAE, source: ActivationSource, rows: torch.Tensor, n_rows: int, n_ce_rows: int, batch_rows: int) -> dict[str, float]:
    was_training = sae.training
    sae.eval()
    try:
        result = reconstruction_metrics(sae, source, rows[:n_rows], batch_rows)
        if n_ce_rows > 0:
            result.update(ce_metrics(sae, source, rows[:n_ce_rows], batch_rows))
    finally:
        sae.train(was_training)
    return result
