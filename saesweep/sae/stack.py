"""Several SAEs of one class and shape as one module: a sweep's members in one batched step.

Each parameter and buffer of the members is stacked, [members, ...], and each member's own
tensor becomes a view of its slice: the member's optimizer, checkpoint, export and evaluation
read and write the stack's values without a copy. An architecture that can be stacked says
so with `SAE.stack_key` (members with equal keys share a stack) and gives the batched maths
as class methods, `forward_stacked` and `after_step_stacked`, whose `stack` is this module:
the stacked counterpart of `self`. Per-member settings (k, coefficients) are read from the
members' configs (`per_member`); the trainer's per-member settings (lr, schedule) stay with
each member's own optimizer.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from saesweep.sae.base import SAE, StepOutput


class SAEStack(nn.Module):
    def __init__(self, saes: list[SAE]):
        super().__init__()
        keys = {sae.stack_key() for sae in saes}
        if None in keys or len(keys) != 1:
            raise ValueError(f"SAEStack: members must share one stack key, got {keys}")
        self.arch = type(saes[0])
        self.saes = list(saes)  # a plain list: the members are not submodules of the stack
        self.n_members = len(saes)
        self.d_in, self.d_out, self.d_sae = saes[0].d_in, saes[0].d_out, saes[0].d_sae
        self._per_member: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        for name, first in saes[0].named_parameters(recurse=False):
            stacked = nn.Parameter(torch.stack([sae._parameters[name].detach() for sae in saes]))
            # Gradients accumulate in place into one stacked buffer: each member's .grad is
            # its slice, which is what its own (fused) optimizer reads.
            stacked.grad = torch.zeros_like(stacked)
            self.register_parameter(name, stacked)
            for sae, data, grad in zip(saes, stacked.data, stacked.grad):
                sae._parameters[name].data = data
                sae._parameters[name].grad = grad
        for name, _ in saes[0].named_buffers(recurse=False):
            stacked = torch.stack([sae._buffers[name] for sae in saes])
            self.register_buffer(name, stacked)
            for sae, view in zip(saes, stacked):
                sae._buffers[name] = view
        if any(True for _ in saes[0].children()):
            raise ValueError(f"SAEStack: {self.arch.__name__} has submodules; stacking covers flat SAEs only")

    @property
    def configs(self) -> list[Any]:
        return [sae.cfg for sae in self.saes]

    def per_member(
        self, name: str, value: Callable[[SAE], float | int | bool], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """[M] of `value(sae)` for each member, on the stack's device, made once under `name`
        (a member's settings do not change while it trains)."""
        key = (name, dtype)
        if key not in self._per_member:
            device = next(self.parameters()).device
            self._per_member[key] = torch.tensor([value(sae) for sae in self.saes], dtype=dtype, device=device)
        return self._per_member[key]

    def zero_grad_(self) -> None:
        torch._foreach_zero_([p.grad for p in self.parameters()])

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> StepOutput:
        """Every member's training pass on the same batch: losses and l0 are [M], fired
        [M, d_sae], recon [M, batch, d_out]."""
        return self.arch.forward_stacked(self, x, target)

    @torch.no_grad()
    def after_step(self, applied: torch.Tensor) -> None:
        """`SAE.after_step` of each member; `applied` [M] bool."""
        self.arch.after_step_stacked(self, applied)
