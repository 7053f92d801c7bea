"""Counting the aten ops of a training step that would make the host wait for a GPU.

On a GPU, an op whose result the host needs (a value, or a size that depends on the data)
blocks the host until all queued work is done, and the device idles until the host has
queued more. A CPU runs the same aten ops, so this mode, counting them on a CPU, tells
which steps would stall a GPU: tests/test_sync_free.py and benchmarks/bench_syncs.py.
What it cannot see: copies to the host (`.tolist()`, `.cpu()` of a CUDA tensor; on a CPU
there is nothing to copy) and syncs inside a CUDA kernel, below the dispatcher.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must have before it can go on. Each one on a GPU waits for all
# the work queued before it.
SYNC_OPS = {
    "_local_scalar_dense": "item(), float(), int(), bool() or `if t:` on a tensor",
    "is_nonzero": "bool() of a one-element tensor",
    "equal": "torch.equal answers a Python bool",
    "nonzero": "its size is the count of true entries (also where(c), argwhere)",
    "masked_select": "its size is the count of true mask entries",
    "repeat_interleave": "with tensor repeats and no output_size, its size is their sum",
    "unique": "its size is the number of distinct values",
    "_unique": "as unique",
    "_unique2": "as unique",
    "unique_dim": "as unique",
    "unique_consecutive": "as unique",
    "unique_dim_consecutive": "as unique",
    "bincount": "its size comes from the largest value",
    "histc": "reads the range from the data when min == max",
    "_coalesce": "a sparse tensor's nnz after merging duplicates",
    "_to_sparse": "dense to sparse: nnz is counted on the host",
    "_to_sparse_csr": "as _to_sparse",
    "_to_sparse_csc": "as _to_sparse",
    "_to_sparse_bsr": "as _to_sparse",
    "_to_sparse_bsc": "as _to_sparse",
    "_validate_sparse_coo_tensor_args": "checks index bounds on the host",
    # torch.tensor(python data, device=...) copies from pageable host memory without
    # non_blocking: the copy waits for the work queued on the device before it.
    "lift_fresh": "a tensor made from Python data (torch.tensor): on a GPU a blocking copy from the host",
}
# Indexing with a bool mask runs nonzero inside the kernel, below this mode: seen by its args.
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}


class SyncCounter(TorchDispatchMode):
    """Counts every aten op and, by name, those that would sync a GPU; `pause` stops counting."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs: Counter[str] = Counter()
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.paused:
            self.ops += 1
            name = func.overloadpacket.__name__
            if name in SYNC_OPS and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
                self.syncs[name] += 1
            elif name in INDEX_OPS and _bool_index(args):
                self.syncs[f"{name} with a bool mask"] += 1
        return func(*args, **kwargs)

    @contextmanager
    def pause(self) -> Iterator[None]:
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def _bool_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
