"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv:2503.17547).

BatchTopK selection, but the first `w` latents must also reconstruct the input on
their own, for each width `w` in `matryoshka_widths`: one squared-error term per
prefix, summed with the full reconstruction's. The early latents then learn the
general, frequent features and the later ones refine them instead of absorbing
them. As SAELens 6 (`MatryoshkaBatchTopKTrainingSAE`): the widths must increase
strictly, d_sae is appended as the last level when missing, every prefix includes
b_dec, the terms are not averaged over levels, and the SAE is saved as a JumpReLU
with BatchTopK's threshold (SAELens's matryoshka inference config is JumpReLU too),
so the nesting lives only in the training loss. AuxK is the TopK family's plain one;
SAELens's optional per-level variant (`use_matryoshka_aux_loss`) is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from saesweep.config.domain import Items, Range, in_domain
from saesweep.errors import UserError
from saesweep.sae.base import mse_loss
from saesweep.sae.batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from saesweep.sae.registry import register_architecture
from saesweep.sae.sparse import ActiveLatents, decode_active, latents_in


@dataclass
class MatryoshkaBatchTopKSAEConfig(BatchTopKSAEConfig):
    architecture: str = "matryoshka_batchtopk"
    # Prefix widths; the SAE width is added as the last level if it is not there.
    matryoshka_widths: List[int] = in_domain([128, 512], Items(Range(gt=0)))

    def check_relations(self) -> None:
        super().check_relations()
        widths = list(self.matryoshka_widths)
        key = "config key 'sae.matryoshka_widths'"
        if any(b <= a for a, b in zip(widths, widths[1:])):
            raise UserError(f"{key}: widths must increase strictly, got {widths}")
        if self.d_sae is not None and widths[-1] > self.d_sae:
            raise UserError(f"{key}: {widths[-1]} exceeds sae.d_sae={self.d_sae}")


@register_architecture("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    config_class = MatryoshkaBatchTopKSAEConfig
    export_architecture = "jumprelu"  # the nesting lives only in the training loss

    def __init__(self, cfg: MatryoshkaBatchTopKSAEConfig, d_in: int, d_out: int | None = None):
        super().__init__(cfg, d_in, d_out)
        widths = list(cfg.matryoshka_widths)
        if widths and widths[-1] > self.d_sae:
            raise UserError(f"config key 'sae.matryoshka_widths': {widths[-1]} exceeds the SAE width {self.d_sae}")
        if not widths or widths[-1] != self.d_sae:
            widths.append(self.d_sae)
        self.widths: tuple[int, ...] = tuple(widths)

    def stack_key(self) -> Optional[tuple[Any, ...]]:
        # BatchTopK's stacked maths with the nested reconstruction: members share the levels
        # (their loss terms), and never a stack with other classes (theirs differ).
        key = super().stack_key()
        return None if key is None else (MatryoshkaBatchTopKSAE, *key[1:], self.widths)

    def reconstruct(self, active: ActiveLatents, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.nested_reconstruction(active, self.W_dec, self.b_dec, target, self.widths)

    @classmethod
    def reconstruct_stacked(
        cls, stack: Any, active: ActiveLatents, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        W_dec = stack.W_dec.flatten(0, 1)  # [M * d_sae, d_out]: the stack's latents numbered globally
        return cls.nested_reconstruction(active, W_dec, stack.b_dec, target, stack.saes[0].widths, stack.d_sae)

    @staticmethod
    def nested_reconstruction(
        active: ActiveLatents,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        target: torch.Tensor,
        widths: tuple[int, ...],
        stacked_width: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decode level by level, each adding its latents to the previous prefix: of one SAE
        (target [batch, d_out]) or of a stack (target [M, batch, d_out], latents numbered
        m * stacked_width + j)."""
        prefix_losses = {}
        recon = b_dec.unsqueeze(-2).expand_as(target)
        lo = 0
        for hi in widths:
            recon = recon + decode_active(latents_in(active, lo, hi, stacked_width), W_dec).view_as(target)
            if hi < widths[-1]:
                prefix_losses[f"mse_prefix_{hi}"] = mse_loss(recon, target)
            lo = hi
        # The full SAE is the outer level: its term keeps the name "mse".
        return recon, {"mse": mse_loss(recon, target), **prefix_losses}
