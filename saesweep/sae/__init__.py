"""The SAE architectures: `sae.architecture` names a class registered with
`register_architecture` (saesweep.sae.registry). Every module of this package is imported
here, so an architecture is one module (plus its conf/architecture/ file) and no list."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Optional

from saesweep.sae.base import SAE, SAEConfig, StepOutput
from saesweep.sae.registry import ARCHITECTURES, register_architecture

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_sae(cfg: SAEConfig, d_in: int, d_out: Optional[int] = None, transcoder: bool = False) -> SAE:
    """The SAE for `cfg`; a transcoder reads one hook and reconstructs another."""
    if transcoder and cfg.apply_b_dec_to_input:
        # b_dec lives in the output hook's space: subtracting it from the input means
        # nothing (SAELens refuses it for transcoders). The run's config is left as given.
        cfg = dataclasses.replace(cfg, apply_b_dec_to_input=False)
    sae = ARCHITECTURES[cfg.architecture](cfg, d_in, d_out)
    sae.transcoder = transcoder
    return sae


__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "StepOutput", "build_sae", "register_architecture"]
