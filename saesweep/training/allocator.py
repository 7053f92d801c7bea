"""Keep freed memory in the process for reuse instead of handing it back to the OS (glibc).

glibc serves a large allocation with a fresh mmap and unmaps it on free, so every training
step's big temporaries - the [batch, d_sae] pre-activations, the LM's per-layer
activations - come back as new pages that the kernel must fault in and zero, a cost paid
again at every step and visible in the encoder's matrix product, the LM forward and a
whole end-to-end run (benchmarks/bench_e2e.py; figures in benchmarks/results/ and the
README). Raising glibc's mmap and trim thresholds keeps freed blocks in the heap for the next step,
as tcmalloc or jemalloc would. Peak memory is unchanged; the process just does not shrink
after a peak.

A user's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (glibc's environment
variables) wins: then nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Above any one tensor of a step; setting it also turns off glibc's own adaptive threshold.
THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raise glibc's thresholds for this process; whether they were raised (False on other
    C libraries, or where the user set them)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
