"""Several SAEs of one shape as one module: a sweep's members in one batched step.

Each parameter and buffer of the members is stacked, [members, ...], and each member's own
tensor becomes a view of its slice: the member's optimizer, checkpoint, export and evaluation
read and write the stack's values without a copy. An architecture that can be stacked says
so with `SAE.stack_key` (members with equal keys share a stack). The key's first item is the
class whose batched maths (`forward_stacked`, `after_step_stacked`, whose `stack` is this
module: the stacked counterpart of `self`) run the stack: mostly the member's own class, but
TopK and BatchTopK share the TopK family's, so a sweep over both is one stack.

Members of one class sit side by side (`segments`). A buffer only some members have (BatchTopK's
threshold beside TopK members) is stacked over its class's segment alone. Per-member settings
(k, coefficients) are read from the members' configs (`per_member`); the trainer's per-member
settings (lr, schedule) stay with each member's own optimizer.
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
        self.arch: type[SAE] = next(iter(keys))[0]  # whose batched maths run the stack
        self.saes = list(saes)  # a plain list: the members are not submodules of the stack
        self.n_members = len(saes)
        self.segments = class_segments(saes)
        if len({kind for kind, _ in self.segments}) != len(self.segments):
            raise ValueError("SAEStack: members of one class must sit side by side")
        self.d_in, self.d_out, self.d_sae = saes[0].d_in, saes[0].d_out, saes[0].d_sae
        self._per_member: dict[tuple[Any, ...], torch.Tensor] = {}
        for name, first in saes[0].named_parameters(recurse=False):
            stacked = nn.Parameter(torch.stack([sae._parameters[name].detach() for sae in saes]))
            # Gradients accumulate in place into one stacked buffer: each member's .grad is
            # its slice, which is what its own (fused) optimizer reads.
            stacked.grad = torch.zeros_like(stacked)
            self.register_parameter(name, stacked)
            for sae, data, grad in zip(saes, stacked.data, stacked.grad):
                sae._parameters[name].data = data
                sae._parameters[name].grad = grad
        for name in dict.fromkeys(name for sae in saes for name, _ in sae.named_buffers(recurse=False)):
            holders = [sae for sae in saes if name in sae._buffers]
            if len(holders) < len(saes) and not any(holders == saes[members] for _, members in self.segments):
                raise ValueError(f"SAEStack: buffer {name!r} must be every member's or one class's")
            stacked = torch.stack([sae._buffers[name] for sae in holders])
            self.register_buffer(name, stacked)
            for sae, view in zip(holders, stacked):
                sae._buffers[name] = view
        # Each member's step count, where some member's training maths read it (a warm-up, a
        # schedule of k): on the device (`steps`) and its copy on the host (`step_counts`),
        # which the trainer (MemberStack) keeps at its members' counts.
        reads_step = any(sae.reads_step() for sae in saes)
        self.steps = torch.zeros(len(saes), dtype=torch.long, device=self._device()) if reads_step else None
        self.step_counts: list[int] = [0] * len(saes)
        if any(True for _ in saes[0].children()):
            raise ValueError(f"SAEStack: {self.arch.__name__} has submodules; stacking covers flat SAEs only")

    @property
    def configs(self) -> list[Any]:
        return [sae.cfg for sae in self.saes]

    def per_member(
        self,
        name: str,
        value: Callable[[SAE], float | int | bool],
        dtype: torch.dtype = torch.float32,
        members: slice = slice(None),
    ) -> torch.Tensor:
        """[M] of `value(sae)` for each member (or those of a segment), on the stack's device,
        made once under `name` (a member's settings do not change while it trains)."""
        key = (name, dtype, members.start, members.stop)
        if key not in self._per_member:
            values = [value(sae) for sae in self.saes[members]]
            self._per_member[key] = torch.tensor(values, dtype=dtype, device=self._device())
        return self._per_member[key]

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def warmed_up(self, name: str, value: Callable[[SAE], float]) -> torch.Tensor:
        """[M] float32: each member's coefficient `value` at its step, as `base.warmed_up` gives
        a separate run (the same double-precision arithmetic, then rounded to float32)."""
        if self.steps is None:
            return self.per_member(name, value)
        full = self.per_member(name, value, torch.float64)
        warm = self.per_member("coefficient_warm_up", lambda sae: sae.coefficient_warm_up(), torch.float64)
        scale = torch.where(warm > 0, ((self.steps + 1) / warm).clamp(max=1.0), 1.0)
        return (full * scale).float()

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


def class_segments(saes: list[SAE]) -> list[tuple[type[SAE], slice]]:
    """(class, members) of each run of consecutive members of one class."""
    segments: list[tuple[type[SAE], slice]] = []
    for i, sae in enumerate(saes):
        if segments and segments[-1][0] is type(sae):
            segments[-1] = (type(sae), slice(segments[-1][1].start, i + 1))
        else:
            segments.append((type(sae), slice(i, i + 1)))
    return segments
