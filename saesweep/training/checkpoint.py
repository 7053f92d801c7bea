"""Checkpoints and stop signals: a run that is preempted or killed continues exactly.

A checkpoint holds everything the next step depends on: SAE, optimizer and
scheduler state, the step, the dead-latent counters, the activation buffer's
contents and shuffling generator, the data position (token rows the LM has consumed,
or the read position in the activation cache), and the elapsed time. Resuming restores all of it, so an interrupted-and-resumed run ends
with the same weights as an uninterrupted one (on CPU; GPU kernels need not be
deterministic). It is written to a temp file and renamed: the previous checkpoint
stays valid until the new one is complete. A data-parallel run's checkpoint (written by
rank 0) also holds every other rank's data position and buffer (`rank_streams`) and the
number of ranks, which a resumption must match.
"""

from __future__ import annotations

import logging
import os
import signal
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import torch

from saesweep.atomic import atomic_write_many
from saesweep.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoints(states: dict[Path, dict[str, Any]], write: Callable[[Any, Path], None] | None = None) -> None:
    """Write the checkpoints of a group's members as one step (atomic_write_many): a crash
    while writing leaves every previous checkpoint. Only a crash between the renames
    (microseconds) leaves members at different points, and the trainer then resumes them as
    separate subgroups. `write(state, tmp)` defaults to torch.save (looked up per call, so
    tests can replace it)."""
    atomic_write_many({Path(path): partial(write or torch.save, state) for path, state in states.items()})


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, if any. Reading only: the temp files of writes a crash
    interrupted are removed by the run that accepts the dir (Member.start)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, keep it for inspection
        raise UserError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); move it away to start afresh, "
            "or set training.resume=never"
        ) from None


class StopSignals:
    """Turns SIGUSR2 (SLURM/submitit preemption), SIGTERM and SIGINT into a flag the
    loop checks between steps, so the checkpoint is taken at a consistent point.
    `resend` then hands the signal to whoever handled it before us: submitit
    requeues the job, the default SIGTERM action ends the process, and SIGINT
    raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            if signal.getsignal(sig) == signal.SIG_IGN:
                # The process was told to ignore it (a shell's background job starts with
                # SIGINT ignored): stopping on it would only be undone by resend.
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def resend(self) -> None:
        """Deliver the received signal to the handler that was there before us."""
        sig, self.received = self.received, None
        previous = self._previous.get(sig, signal.SIG_DFL) if sig is not None else signal.SIG_IGN
        if callable(previous):  # submitit's requeue, or Python's KeyboardInterrupt for SIGINT
            previous(sig, None)
        elif previous == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)  # the default action: the process ends here
