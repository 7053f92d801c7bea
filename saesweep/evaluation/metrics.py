"""Reconstruction metrics, accumulated over many batches in float64.

explained variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole
eval set (not a mean of per-batch or per-dimension ratios).
mse = mean over tokens and dimensions of (x - x_hat)^2.
l0 = mean number of non-zero latents per token.
A latent is dead if it never fires over the window; `tokens` says how long it was.
"""

from __future__ import annotations

import torch


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """A float64 scalar on x's device: the training loop reads it back with its other metrics."""
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1 - resid / total


class ReconstructionStats:
    def __init__(self, d: int, d_sae: int, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_sq_x = torch.zeros((), dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.tokens += len(x)
        self.sq_err += (x - x_hat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_sq_x += x.pow(2).sum()
        nonzero = acts != 0
        self.active += nonzero.sum()
        self.fired |= nonzero.any(0)

    def result(self) -> dict[str, float]:
        n = self.tokens
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2
        total_var = self.sum_sq_x - self.sum_x.pow(2).sum() / n
        return {
            "l0": float(self.active / n),
            "mse": float(self.sq_err / (n * len(self.sum_x))),
            "explained_variance": float(1 - self.sq_err / total_var),
            "dead_fraction": float((~self.fired).double().mean()),
            "dead_window_tokens": n,
        }


def ce_loss_score(ce_clean: float, ce_sae: float, ce_ablation: float) -> float:
    """Fraction of the CE gap between zero-ablation and clean recovered by the SAE."""
    return (ce_ablation - ce_sae) / (ce_ablation - ce_clean)
