"""TopK SAE: per token, the k largest pre-activations survive (then ReLU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from saesweep.errors import UserError
from saesweep.sae.base import SAE, SAEConfig, StepOutput, mse_loss
from saesweep.sae.sparse import decode_active, encode_active, topk_indices


@dataclass
class TopKSAEConfig(SAEConfig):
    architecture: str = "topk"
    k: int = 32
    decoder_init_norm: float = 1.0

    def check(self) -> None:
        super().check()
        if self.k <= 0:
            raise UserError(f"config key 'sae.k': must be > 0, got {self.k}")
        if self.d_sae is not None and self.k > self.d_sae:
            raise UserError(f"config key 'sae.k': {self.k} exceeds sae.d_sae={self.d_sae}")


def topk_per_row(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, ReLU'd; zeros elsewhere."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


class TopKFamilySAE(SAE):
    """Shared by TopK and BatchTopK: train through the sparse kernels.

    Subclasses say which latents survive (`select`) and how that reads densely
    for inference (`activation`).
    """

    # Unit decoder rows make the ranking of pre-activations mean what it says.
    unit_norm_decoder = True

    def __init__(self, cfg: TopKSAEConfig, d_in: int, d_out: int | None = None):
        super().__init__(cfg, d_in, d_out)
        if cfg.k > self.d_sae:
            raise UserError(f"config key 'sae.k': {cfg.k} exceeds the SAE width {self.d_sae}")

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, target: torch.Tensor, step: int) -> StepOutput:
        x = x * self.input_scale
        target = target * self.target_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        active = encode_active(x, self.W_enc, self.b_enc, self.select)
        recon = decode_active(active, self.W_dec, self.b_dec)
        self.on_active(active)
        return StepOutput(
            recon=recon / self.target_scale,
            losses={"mse": mse_loss(recon, target)},
            l0=active.l0(),
            fired=active.fired(),
        )

    def on_active(self, active: Any) -> None:
        """Hook for running statistics of the selected activations."""


class TopKSAE(TopKFamilySAE):
    config_class = TopKSAEConfig
    export_architecture = "topk"

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_indices(pre, self.cfg.k)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_per_row(pre, self.cfg.k)

    def export_config(self) -> dict[str, Any]:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
