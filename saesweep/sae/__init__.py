"""The architecture registry: `sae.architecture` names one of these classes."""

from __future__ import annotations

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


def build_sae(cfg: SAEConfig, d_in: int, d_out: Optional[int] = None) -> SAE:
    return ARCHITECTURES[cfg.architecture](cfg, d_in, d_out)


__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "StepOutput", "build_sae"]
