"""training.compile: the SAE step's forward, losses and backward as compiled graphs.

`SAEStep` is what a member (or a stack of members, saesweep.training.stacked) calls each
step: zero the gradients, run the training forward and sum its losses, backpropagate.
With training.compile the forward and losses are one torch.compile'd function, and
AOTAutograd compiles their backward too, so `backward()` replays a compiled graph as well.
On CUDA the mode is "reduce-overhead": the graphs are captured as CUDA graphs and replayed,
one launch where eager mode launches kernel after kernel (the step reads nothing back from
the device in steady state, which capture needs). The optimizer stays the fused one: one
kernel already. Shapes are static: every step has the same batch size (the buffer only
hands out full batches).

Compilation happens at the first calls and may fail (no compiler toolchain, an op the
compiler cannot trace, a device that cannot capture). Then one warning names
training.compile and the reason, and the same step runs eagerly from then on. What the
failed attempt may have changed is undone first: the SAE's buffers (its running state)
are restored from a copy taken before each of the first calls, and the gradients zeroed
again, so the eager retry takes the step as if compilation had never been tried.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from saesweep.sae.base import StepOutput

log = logging.getLogger(__name__)

# The compiler backend: "inductor" generates fused kernels (C++ on a CPU, Triton on a GPU).
BACKEND = "inductor"
# Set by tests to make the compiled path fail at its first call (the fallback is what they check).
FORCE_FAILURE: str | None = None
# Calls guarded by a copy of the SAE's buffers: compilation (and CUDA graph capture, which
# records on a later call than the first) happens within these.
GUARDED_CALLS = 3

Forward = Callable[..., tuple[StepOutput, torch.Tensor]]


def compile_mode(device: torch.device) -> str | None:
    """CUDA graphs where the device can capture them; the default (fusion only) elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


class SAEStep:
    """zero_grad, `forward(*args)` -> (StepOutput, loss), then the loss's backward; eager, or
    compiled (`compile`) with an eager fallback. `module`: whose buffers the forward may
    change (restored if a compiled attempt fails)."""

    def __init__(
        self,
        forward: Forward,
        zero_grad: Callable[[], None],
        module: torch.nn.Module,
        device: torch.device,
        compile: bool,
        what: str,
    ):
        self.forward, self.zero_grad, self.module, self.what = forward, zero_grad, module, what
        self.mode = compile_mode(device)
        self.compiled: Forward | None = torch.compile(forward, mode=self.mode, backend=BACKEND) if compile else None
        self.calls = 0
        self.failure: str | None = None  # why the compiled path was given up

    def __call__(self, *args: Any) -> tuple[StepOutput, torch.Tensor]:
        if self.compiled is not None:
            saved = [b.clone() for b in self.module.buffers()] if self.calls < GUARDED_CALLS else None
            try:
                if FORCE_FAILURE is not None:
                    raise RuntimeError(FORCE_FAILURE)
                if self.mode == "reduce-overhead":
                    # A new step: the previous replay's outputs may be overwritten (callers
                    # keep copies of anything they read after the step).
                    torch.compiler.cudagraph_mark_step_begin()
                result = self._run(self.compiled, args)
                self.calls += 1
                return result
            except Exception as e:  # any failure of the compiled path means: run eager
                if saved is None:
                    raise  # compiled and proven: an error of the step itself, not of compilation
                self.give_up(e, saved)
        return self._run(self.forward, args)

    def _run(self, forward: Forward, args: tuple[Any, ...]) -> tuple[StepOutput, torch.Tensor]:
        self.zero_grad()
        out, loss = forward(*args)
        # A stack's loss is [members]: each member's gets gradient 1, as in its own backward.
        (loss if loss.ndim == 0 else loss.sum()).backward()
        return out, loss

    def give_up(self, error: Exception, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for buffer, copy in zip(self.module.buffers(), saved):
                buffer.copy_(copy)
        self.compiled = None
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self.failure = f"{type(error).__name__}: {message}"[:300]
        log.warning("training.compile: compiling %s failed (%s); training continues eager", self.what, self.failure)
