"""`buffer.size_tokens=auto`: the activation buffer sized from the training device's free memory.

The buffer lives on the training device. Its size is decided before its first fill, once
the LM is placed and before the SAEs are built, so their training state is estimated
(built on the meta device, which allocates nothing) and set aside first. Of what is left a
quarter stays free for the step's temporaries, the LM's forward and the allocator's
fragmentation; the rest holds the buffer at its peak, which is during a refill: the
buffer, its fresh half and its reshuffled copy at once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

HEADROOM = 0.25  # of the free memory after the SAEs: never planned for the buffer
PEAK_COPIES = 2.5  # buffer + fresh half + the shuffle's full copy, during a refill
# Every checkpoint carries the buffer, and past a few million tokens a bigger buffer
# shuffles no better: auto never goes beyond this.
AUTO_MAX_TOKENS = 2**22
SAE_STATE_COPIES = 4  # parameters, gradients and Adam's two moments, fp32


def auto_buffer_tokens(free_bytes: int, reserved_bytes: int, bytes_per_token: int, batch: int, cap: int) -> int:
    """Tokens the buffer holds: what fits in `free_bytes` less `reserved_bytes` and the
    headroom at its refill peak, in whole batches, at least two batches, at most `cap`
    (rounded up to whole batches) and AUTO_MAX_TOKENS."""
    budget = max(0.0, (free_bytes - reserved_bytes) * (1 - HEADROOM) / PEAK_COPIES)
    fits = int(budget // bytes_per_token) // batch * batch
    most = min(-(-cap // batch) * batch, max(AUTO_MAX_TOKENS // batch, 1) * batch)
    return max(2 * batch, min(fits, most))


def free_memory(device: torch.device) -> int:
    """Bytes the buffer may take on `device`: the GPU's free memory plus what the caching
    allocator holds unused; on the CPU the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def sae_state_bytes(cfgs: list[Any], d_in: int, d_out: int) -> int:
    """The members' SAE training state, estimated from SAEs built on the meta device."""
    from saesweep.sae import build_sae

    total = 0
    for cfg in cfgs:
        transcoder = cfg.model.hook_point_out not in (None, cfg.model.hook_point)
        with torch.device("meta"):
            sae = build_sae(cfg.sae, d_in, d_out, transcoder)
        params = sum(p.numel() for p in sae.parameters()) * 4 * SAE_STATE_COPIES
        total += params + sum(b.numel() * b.element_size() for b in sae.buffers())
    return total


def buffer_capacity(cfgs: list[Any], widths: list[int], device: torch.device, batch: int, limit: int) -> int:
    """buffer.size_tokens as the run uses it: the configured count, or auto's (logged)."""
    size = cfgs[0].buffer.size_tokens
    if size != "auto":
        return max(2 * batch, size)
    free = free_memory(device)
    reserved = sae_state_bytes(cfgs, widths[0], widths[-1])
    tokens = auto_buffer_tokens(free, reserved, sum(widths) * 4, batch, limit)
    log.info(
        "buffer.size_tokens=auto: %d tokens on %s (%.2f GiB free, %.2f GiB set aside for %d SAE(s))",
        tokens,
        device,
        free / 2**30,
        reserved / 2**30,
        len(cfgs),
    )
    return tokens
