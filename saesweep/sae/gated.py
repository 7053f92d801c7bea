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
from typing import Optional

import torch
from torch import nn

from saesweep.sae.base import SAE, StepOutput, mse_loss
from saesweep.sae.registry import register_architecture
from saesweep.sae.standard import StandardSAEConfig


@dataclass
class GatedSAEConfig(StandardSAEConfig):
    """The standard SAE's knobs (l1_coefficient, l1_warm_up_steps) plus the aux switch."""

    architecture: str = "gated"
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

    def l1_coefficient(self, step: int) -> float:
        """Linear warm-up from 0 over l1_warm_up_steps, as the standard SAE."""
        warm = self.cfg.l1_warm_up_steps
        return self.cfg.l1_coefficient * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, magnitude) pre-activations of input already in the SAE's scaled space."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        gate_pre = x @ self.W_enc + self.b_gate
        mag_pre = x @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return gate_pre, mag_pre

    @staticmethod
    def combine(gate_pre: torch.Tensor, mag_pre: torch.Tensor) -> torch.Tensor:
        return (gate_pre > 0).to(mag_pre.dtype) * torch.relu(mag_pre)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """The magnitude path's pre-activations (what SAELens hooks as acts_pre)."""
        return self.gate_and_magnitude(x)[1]

    def forward(self, x: torch.Tensor, target: torch.Tensor, step: int) -> StepOutput:
        target = target * self.target_scale
        gate_pre, mag_pre = self.gate_and_magnitude(x * self.input_scale)
        acts = self.combine(gate_pre, mag_pre)
        recon = self.decode_scaled(acts)

        gate_acts = torch.relu(gate_pre)
        W_dec, b_dec = self.W_dec, self.b_dec
        if self.cfg.aux_detach_decoder:
            W_dec, b_dec = W_dec.detach(), b_dec.detach()
        via_gate = gate_acts @ W_dec + b_dec
        losses = {
            "mse": mse_loss(recon, target),
            "l1": self.l1_coefficient(step) * (gate_acts * self.W_dec.norm(dim=1)).sum(-1).mean(),
            "aux_recon": mse_loss(via_gate, target),
        }
        return self.step_output(recon, losses, acts)

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
