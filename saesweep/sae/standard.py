"""ReLU SAE with an L1 penalty on activations weighted by decoder row norms (SAELens "standard")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from saesweep.config.domain import Range, in_domain
from saesweep.sae.base import SAE, SAEConfig, warmed_up
from saesweep.sae.registry import register_architecture


@dataclass
class StandardSAEConfig(SAEConfig):
    architecture: str = "standard"
    l1_coefficient: float = in_domain(5.0, Range(ge=0))  # the SAELens guide's example value
    l1_warm_up_steps: int = in_domain(0, Range(ge=0))


@register_architecture("standard")
class StandardSAE(SAE):
    config_class = StandardSAEConfig
    export_architecture = "standard"
    export_transcoder_architecture = "transcoder"

    def coefficient_warm_up(self) -> int:
        return self.cfg.l1_warm_up_steps

    def l1_coefficient(self, step: int) -> float:
        return warmed_up(self.cfg.l1_coefficient, step, self.cfg.l1_warm_up_steps)

    def loss_terms(self, pre: torch.Tensor, acts: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        weighted = acts * self.W_dec.norm(dim=1)
        return {"l1": self.l1_coefficient(step) * weighted.sum(-1).mean()}

    def stack_key(self) -> Optional[tuple[Any, ...]]:
        # The L1 coefficient and its warm-up may differ per member.
        return (type(self), self.d_in, self.d_out, self.d_sae, self.cfg.apply_b_dec_to_input)

    @classmethod
    def loss_terms_stacked(cls, stack: Any, pre: torch.Tensor, acts: torch.Tensor) -> dict[str, torch.Tensor]:
        weighted = acts * stack.W_dec.norm(dim=-1).unsqueeze(1)
        coefficient = stack.warmed_up("l1_coefficient", lambda sae: sae.cfg.l1_coefficient)
        return {"l1": coefficient * weighted.sum(-1).mean(-1)}
