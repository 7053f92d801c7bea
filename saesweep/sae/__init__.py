"""The architecture registry: `sae.architecture` names one of these classes."""

from __future__ import annotations

import dataclasses
from typing import Optional

from saesweep.sae.base import SAE, SAEConfig, StepOutput
from saesweep.sae.batchtopk import BatchTopKSAE
from saesweep.sae.gated import GatedSAE
from saesweep.sae.jumprelu import JumpReLUSAE
from saesweep.sae.matryoshka import MatryoshkaBatchTopKSAE
from saesweep.sae.standard import StandardSAE
from saesweep.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    "standard": StandardSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "gated": GatedSAE,
    "jumprelu": JumpReLUSAE,
}


def build_sae(cfg: SAEConfig, d_in: int, d_out: Optional[int] = None, transcoder: bool = False) -> SAE:
    """The SAE for `cfg`; a transcoder reads one hook and reconstructs another."""
    if transcoder and cfg.apply_b_dec_to_input:
        # b_dec lives in the output hook's space: subtracting it from the input means
        # nothing (SAELens refuses it for transcoders). The run's config is left as given.
        cfg = dataclasses.replace(cfg, apply_b_dec_to_input=False)
    sae = ARCHITECTURES[cfg.architecture](cfg, d_in, d_out)
    sae.transcoder = transcoder
    return sae


__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "StepOutput", "build_sae"]
