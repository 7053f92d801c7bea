"""The one way training values reach the host: one stacked copy, on logging steps only.

A GPU step that reads a value back (`float(loss)`, `bool(flag)`, a count that sizes a
tensor) makes the host wait until the device has finished all queued work, and the
device then idles until the host has queued the next step. So the loop reads nothing
back in its steady steps; on a logging step each member stacks what it needs (metrics,
its record of skipped steps) into one tensor, and the group fetches them all here, with
one copy (saesweep.training.member.read_back). tests/test_sync_free.py counts the calls.
"""

from __future__ import annotations

import torch


def to_host(values: torch.Tensor) -> list[float]:
    """`values` (1-D, on the training device) as Python floats, in one transfer.

    From a GPU the copy goes into pinned memory without blocking the stream, and the
    host waits for that copy only, not for a second transfer per value."""
    if values.device.type != "cuda":
        return values.tolist()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host.tolist()
