"""Members of a group that can train as one stacked model do (issue 17, item 2).

Members whose SAEs share a stack key (saesweep.sae.SAE.stack_key: batched maths and shapes) and hooks take one
batched forward and backward (saesweep.sae.stack.SAEStack), so a group of 8 dispatches about
the ops of one member instead of 8 times them. What stays per member is what differs per
member: each keeps its own optimizer, stepped over its slices of the stacked tensors by the
fused kernel (one launch per member), so its lr, betas, weight decay and schedule are its own
and it updates bit for bit as a separate run would; its own non-finite skip (the kernel's
found_inf); its scheduler, metrics, checkpoint and run dir. Why not one optimizer over the
stack: torch's fused Adam takes one lr and one found_inf per call, and a hand-written batched
Adam would round differently from the separate runs the members must equal.

Every other member steps alone (`Member.train_step`), as before stacks existed.
"""

from __future__ import annotations

import logging
from typing import Iterable, Union

import torch

from saesweep.activations.buffer import to_device
from saesweep.sae.base import StepOutput
from saesweep.sae.stack import SAEStack
from saesweep.training.compiled import SAEStep
from saesweep.training.member import Member, since_fired, skip_decision

log = logging.getLogger(__name__)


class MemberStack:
    """Members that train as one stacked model; the members' own tensors become its views."""

    def __init__(self, members: list[Member]):
        self.members = members
        self.sae = SAEStack([m.sae for m in members])
        # Per-member device state, stacked; each member keeps a view, so a later stack (after
        # a member left) starts from what this one left.
        self.nonfinite = torch.stack([m.nonfinite for m in members])
        self.tokens_since_fired = torch.stack([m.tokens_since_fired for m in members])
        self.found_inf = torch.zeros(len(members), device=self.nonfinite.device)
        for member, nonfinite, counts, found_inf in zip(
            members, self.nonfinite, self.tokens_since_fired, self.found_inf
        ):
            member.nonfinite, member.tokens_since_fired = nonfinite, counts
            member.optimizer.found_inf = found_inf  # the fused kernel skips where it is 1
            member.stacked = True
        # The grads in the order each member's clip_grad_norm_ would take them.
        self.grads = [p.grad for m in members for p in m.sae.parameters()]
        self.amp = members[0].amp
        self.settings = members[0].cfg.training  # the members share it (the grouped launcher checks)
        # Forward, losses and backward of the whole stack: compiled with training.compile.
        self.sae_step = SAEStep(
            self.forward_loss,
            self.sae.zero_grad_,
            self.sae,
            self.nonfinite.device,
            self.settings.compile,
            f"the stacked step of {', '.join(m.run_dir.name for m in members)}",
        )
        log.info(
            "%d members train as one stacked %s: %s",
            len(members),
            " + ".join(kind.__name__ for kind, _ in self.sae.segments),
            ", ".join(m.run_dir.name for m in members),
        )

    def own(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' columns of the feed's batch: one hook's (the stack key holds it)."""
        return self.members[0].own(batch)

    def train_step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """One step of every member on this batch; an error ends every member of the stack."""
        try:
            self._step(x, target)
        except Exception as e:
            for member in self.members:
                member.fail(e)
                member.metrics.close()

    def forward_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[StepOutput, torch.Tensor]:
        """Every member's training forward and its summed loss, [members] (what
        training.compile compiles)."""
        with self.amp():
            out = self.sae(x, target)
            return out, sum(out.losses.values())

    def _step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        if self.sae.steps is not None:
            self.send_steps()
        # The backward of loss.sum(): each member's loss gets gradient 1, as in its own.
        out, loss = self.sae_step(x, target)
        grad_norm = self.clip_gradients()
        applied, nonfinite = skip_decision(
            torch.isfinite(loss.detach() + grad_norm), self.nonfinite, self.settings.max_nonfinite_steps
        )
        self.nonfinite.copy_(nonfinite)
        self.found_inf.copy_(~applied)
        for member in self.members:
            member.optimizer.step()
            member.scheduler.step()  # as if applied; `caught_up` winds it back over skipped steps
        self.sae.after_step(applied)
        self.tokens_since_fired.copy_(since_fired(self.tokens_since_fired, out.fired, applied, len(x)))
        if self.sae.steps is not None:
            self.sae.steps.add_(1)  # as each member's count goes on (`stepped`)
            self.sae.step_counts = [step + 1 for step in self.sae.step_counts]
        records = torch.stack([applied, loss.detach(), grad_norm], dim=1)  # promoted to a float dtype
        for i, (member, record) in enumerate(zip(self.members, records.unbind())):
            if member.stepped(record):
                member.measure(member_output(out, i), target)

    def send_steps(self) -> None:
        """The members' step counts to the stack's `steps`, where the device's count differs:
        at the stack's first step, or after a read-back wound skipped steps back."""
        steps = [member.step for member in self.members]
        if steps != self.sae.step_counts:
            self.sae.steps.copy_(to_device(torch.tensor(steps), self.sae.steps.device))
            self.sae.step_counts = steps

    def clip_gradients(self) -> torch.Tensor:
        """[members] gradient norms, each member's clipped as `clip_grad_norm_` clips a
        separate run's (the same per-tensor norms, combined the same way)."""
        n = len(self.members)
        norms = torch.stack(torch._foreach_norm(self.grads)).view(n, -1)
        total = torch.linalg.vector_norm(norms, 2, dim=1)
        max_norm = self.settings.grad_clip_norm or float("inf")
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in (p.grad for p in self.sae.parameters()):
            grad.mul_(scale.view(n, *[1] * (grad.ndim - 1)))
        return total


def member_output(out: StepOutput, i: int) -> StepOutput:
    """Member i's part of a stack's StepOutput."""
    return StepOutput(
        recon=out.recon[i],
        losses={k: v[i] for k, v in out.losses.items()},
        l0=out.l0[i],
        fired=out.fired[i],
    )


Stepper = Union[Member, MemberStack]


class Steppers:
    """What steps a group's training members: stacks where members share a stack key, the
    others alone; formed again only when the set of members changes (one finished or failed:
    it leaves its stack, and keeps its last state as views of the old one)."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.steppers: list[Stepper] = []

    def covering(self, members: Iterable[Member]) -> list[Stepper]:
        members = list(members)
        if [id(m) for m in members] != [id(m) for m in self.members]:
            self.members, self.steppers = members, form_stacks(members)
        return self.steppers


def form_stacks(members: list[Member]) -> list[Stepper]:
    """A MemberStack for each set of two or more members with equal stack keys; the rest alone."""
    by_key: dict[object, list[Member]] = {}
    alone: list[Stepper] = []
    for member in members:
        key = member.stack_key()
        if key is None:
            alone.append(member)
        else:
            by_key.setdefault(key, []).append(member)
    stacks: list[Stepper] = [MemberStack(by_class(g)) if len(g) > 1 else g[0] for g in by_key.values()]
    return stacks + alone


def by_class(members: list[Member]) -> list[Member]:
    """The members with those of one SAE class side by side (a stack's segments), classes in
    the order they first appear."""
    first: dict[type, int] = {}
    for member in members:
        first.setdefault(type(member.sae), len(first))
    return sorted(members, key=lambda m: first[type(m.sae)])
