"""allocator.keep_freed_memory: a freed big tensor stays in the process for the next step."""

import os
import subprocess
import sys

import pytest

from saesweep.training.allocator import USER_SETTINGS, keep_freed_memory

# In a fresh interpreter: RSS (MiB) after a 256 MiB tensor was written and freed.
PROBE = """
import sys, torch
from saesweep.training.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else False
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mib()
t = torch.ones(64 * 2**20)  # 256 MiB, written
del t
print(kept, rss_mib() - before)
"""


def probe(mode: str) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    kept, grown = out.stdout.split()
    return kept == "True", float(grown)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_tensor_stays_in_the_process_only_when_kept():
    kept, grown = probe("kept")
    assert kept and grown > 200  # still resident: the next step reuses it without page faults
    kept, grown = probe("glibc")
    assert not kept and grown < 50  # glibc unmapped it: the next step faults it in again


def test_the_users_own_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
