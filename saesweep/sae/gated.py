"""Gated SAE (Rajamanoharan et al. 2024, arXiv:2404.16014), as SAELens "gated".

Two encoder paths share one direction matrix W_enc:
- the gate decides which latents fire: H(x_c W_enc + b_gate) (x_c = x - b_dec);
- the magnitude path says how strongly: ReLU(x_c (W_enc * exp(r_mag)) + b_mag).
The gate's step function has no gradient, so two extra terms train it: an L1 on
ReLU(gate pre-activations) weighted by decoder row norms, and an auxiliary
reconstruction of the target from those gate activations.

By default the auxiliary reconstruction trains the decoder too, as SAELens 6 does.
The paper defines it with a frozen decoder, so that it trains only the gate;
`aux_detach_decoder: true` does that, but trained far worse on our default setup
(benchmarks/results/architectures_retuned.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from saesweep.config.domain import Range, in_domain
from saesweep.sae.base import SAE, StepOutput, mse_loss, warmed_up
from saesweep.sae.registry import register_architecture
from saesweep.sae.standard import StandardSAEConfig


@dataclass
class GatedSAEConfig(StandardSAEConfig):
    """The standard SAE's knobs (l1_coefficient, l1_warm_up_steps) plus the aux switch."""

    architecture: str = "gated"
    # Its own lr, L1 coefficient and L1 warm-up, not the standard SAE's (whose fields it inherits).
    # 5x optimizer.lr (2e-3 at the default 4e-4; the paper's lr is for runs far longer than
    # the default 244 steps): at 1x the default 1M-token run ended at L0 97.8, EV 0.858; at
    # 5x it ends at L0 31.6, EV 0.879, CE loss score 0.997, 0.4 % dead, on the TopK frontier
    # (k=32: EV 0.876 at L0 32). L1 3 at 5x: L0 42.7, EV 0.899, 0.1 % dead
    # (benchmarks/results/architectures_defaults.md).
    lr_multiplier: float = in_domain(5.0, Range(gt=0))
    l1_coefficient: float = in_domain(5.0, Range(ge=0))
    # 0: the 5x lr above reaches the frontier with 0.4 % dead without one (the standard SAE
    # needs its 61-step warm-up at its 7x lr; the gated one was not measured with it).
    l1_warm_up_steps: int = in_domain(0, Range(ge=0))
    # false: the aux reconstruction's gradient reaches W_dec/b_dec too, as SAELens 6 does.
    # true detaches the decoder there, as the paper's frozen decoder; on the default 1M-token
    # run that trained far worse (benchmarks/results/architectures_retuned.md).
    aux_detach_decoder: bool = False


@register_architecture("gated")
class GatedSAE(SAE):
    config_class = GatedSAEConfig
    export_architecture = "gated"

    def __init__(self, cfg: GatedSAEConfig, d_in: int, d_out: Optional[int] = None):
        super().__init__(cfg, d_in, d_out)
        # b_gate and b_mag replace b_enc; SAELens's gated loader refuses a b_enc.
        del self.b_enc
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))
        # log of the magnitude path's per-latent rescaling of W_enc; 0 = same as the gate
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))

    def coefficient_warm_up(self) -> int:
        return self.cfg.l1_warm_up_steps

    def l1_coefficient(self, step: int) -> float:
        return warmed_up(self.cfg.l1_coefficient, step, self.cfg.l1_warm_up_steps)

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, magnitude) pre-activations of input already in the SAE's scaled space."""
        return self.paths(self, self.cfg, x)

    @staticmethod
    def paths(sae: Any, cfg: GatedSAEConfig, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`gate_and_magnitude` of one SAE ([batch, d_in] x) or of a stack of them ([M, batch,
        d_in]; `sae` the SAEStack), with the same elementwise maths in either shape."""
        if cfg.apply_b_dec_to_input:
            x = x - sae.b_dec.unsqueeze(-2)
        gate_pre = x @ sae.W_enc + sae.b_gate.unsqueeze(-2)
        mag_pre = x @ (sae.W_enc * sae.r_mag.exp().unsqueeze(-2)) + sae.b_mag.unsqueeze(-2)
        return gate_pre, mag_pre

    @staticmethod
    def combine(gate_pre: torch.Tensor, mag_pre: torch.Tensor) -> torch.Tensor:
        return (gate_pre > 0).to(mag_pre.dtype) * torch.relu(mag_pre)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """The magnitude path's pre-activations (what SAELens hooks as acts_pre)."""
        return self.gate_and_magnitude(x)[1]

    def forward(self, x: torch.Tensor, target: torch.Tensor, step: int) -> StepOutput:
        scaled = x * self.input_scale, target * self.target_scale
        return self.step_output(*self.gated_pass(self, self.cfg, *scaled, self.l1_coefficient(step)))

    @classmethod
    def gated_pass(
        cls, sae: Any, cfg: GatedSAEConfig, x: torch.Tensor, target: torch.Tensor, l1_coefficient: float | torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(reconstruction, losses, activations) in the scaled space, of one SAE or a stack."""
        gate_pre, mag_pre = cls.paths(sae, cfg, x)
        acts = cls.combine(gate_pre, mag_pre)
        recon = acts @ sae.W_dec + sae.b_dec.unsqueeze(-2)

        gate_acts = torch.relu(gate_pre)
        W_dec, b_dec = sae.W_dec, sae.b_dec
        if cfg.aux_detach_decoder:
            W_dec, b_dec = W_dec.detach(), b_dec.detach()
        via_gate = gate_acts @ W_dec + b_dec.unsqueeze(-2)
        losses = {
            "mse": mse_loss(recon, target),
            "l1": l1_coefficient * (gate_acts * sae.W_dec.norm(dim=-1).unsqueeze(-2)).sum(-1).mean(-1),
            "aux_recon": mse_loss(via_gate, target),
        }
        return recon, losses, acts

    # --- a stack of members (saesweep.sae.stack) ----------------------------------------------

    def stack_key(self) -> Optional[tuple[Any, ...]]:
        # The L1 coefficient and its warm-up may differ per member.
        cfg = self.cfg
        return (type(self), self.d_in, self.d_out, self.d_sae, cfg.apply_b_dec_to_input, cfg.aux_detach_decoder)

    @classmethod
    def forward_stacked(cls, stack: Any, x: torch.Tensor, target: torch.Tensor) -> StepOutput:
        n = stack.n_members
        scaled = x * stack.input_scale.view(n, 1, 1), target * stack.target_scale.view(n, 1, 1)
        l1 = stack.warmed_up("l1_coefficient", lambda sae: sae.cfg.l1_coefficient)
        return cls.step_output_stacked(stack, *cls.gated_pass(stack, stack.configs[0], *scaled, l1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.gate_and_magnitude(x * self.input_scale))

    @torch.no_grad()
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """SAELens's gated tensors. Scaling the input by s scales both paths' x W_enc
        terms by s, so folding s into W_enc (and b_dec's 1/s on the target side, as
        the base class) leaves the biases and r_mag untouched."""
        s_in, s_out = self.input_scale, self.target_scale
        return {
            "W_enc": (self.W_enc * s_in).contiguous(),
            "b_gate": self.b_gate.clone(),
            "b_mag": self.b_mag.clone(),
            "r_mag": self.r_mag.clone(),
            "W_dec": (self.W_dec / s_out).contiguous(),
            "b_dec": (self.b_dec / s_out).contiguous(),
        }
