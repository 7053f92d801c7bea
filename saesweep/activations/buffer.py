"""A shuffling buffer of activations that knows nothing about SAEs.

It holds `capacity` tokens' activations on the training device, as one or more
aligned columns (input, and a target for transcoders), hands out `batch_size`
rows at a time in random order, and when half of it has been read keeps the
unread half, refills the rest from the source and reshuffles. Given a `limit` (the
tokens the run will read), it never pulls more than that from the source: the last
refill takes only what is left and the buffer shrinks, and a source that can stop
short (the live LM feed) computes only the rows that hold it, so no activation is
computed that no step trains on; a batch asked for beyond it (a skipped step made up)
is pulled fresh.
"""

from __future__ import annotations

from typing import Iterator

import torch

Columns = tuple[torch.Tensor, ...]


class ActivationBuffer:
    def __init__(
        self,
        source: Iterator[Columns],
        capacity: int,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
        limit: int | None = None,
    ):
        if capacity < 2 * batch_size:
            raise ValueError(f"buffer capacity {capacity} must hold two batches of {batch_size}")
        self.source = source
        self.capacity = capacity
        self.batch_size = batch_size
        self.device = device
        self.generator = generator
        self.dtype = dtype
        self._spill: Columns | None = None
        self.columns: list[torch.Tensor] | None = None
        self.read = 0  # rows handed out since the last refill
        self.limit = limit
        self.pulled = 0  # tokens taken from the source so far

    def _room(self, n: int) -> int:
        return n if self.limit is None else min(n, self.limit - self.pulled)

    def _take(self, n: int) -> list[torch.Tensor]:
        """n tokens from the source, keeping any excess for the next call."""
        parts: list[Columns] = []
        have = 0
        while have < n:
            chunk = self._spill if self._spill is not None else self._next_chunk(have)
            self._spill = None
            chunk = tuple(c.to(self.device, self.dtype, non_blocking=True) for c in chunk)
            need = n - have
            if len(chunk[0]) > need:
                self._spill = tuple(c[need:] for c in chunk)
                chunk = tuple(c[:need] for c in chunk)
            parts.append(chunk)
            have += len(chunk[0])
        self.pulled += n
        return [torch.cat(col) for col in zip(*parts)]

    def _next_chunk(self, have: int) -> Columns:
        """The source's next chunk. A source that can stop short (the live LM feed) is told
        how many tokens the run still needs, so its last chunk holds no more than that."""
        next_chunk = getattr(self.source, "next_chunk", None)
        if next_chunk is None or self.limit is None:
            return next(self.source)
        return next_chunk(self.limit - self.pulled - have)

    def _refill(self) -> None:
        if self.columns is None:
            self.columns = self._take(self._room(self.capacity))
            self.capacity = len(self.columns[0])
        elif (n := self._room(self.read)) == self.read:
            # The unread tail moves to the front; fresh activations fill the rest.
            keep = self.capacity - self.read
            fresh = self._take(n)
            for col, new in zip(self.columns, fresh):
                col[:keep] = col[self.read :].clone()
                col[keep:] = new
        else:
            # The last refill before the limit: the buffer shrinks to the unread tail plus what is left.
            fresh = self._take(n)
            self.columns = [torch.cat([col[self.read :], new]) for col, new in zip(self.columns, fresh)]
            self.capacity = len(self.columns[0])
        perm = torch.randperm(self.capacity, generator=self.generator).to(self.device)
        self.columns = [col[perm] for col in self.columns]
        self.read = 0

    def sample(self) -> Columns:
        """The first fill, for data-dependent initialisation."""
        if self.columns is None:
            self._refill()
        return tuple(self.columns)

    def state_dict(self) -> dict:
        """Contents, read position, leftover source chunk and generator: all a resume needs."""
        return {
            "columns": [c.cpu() for c in self.columns] if self.columns is not None else None,
            "read": self.read,
            "pulled": self.pulled,
            "spill": [c.cpu() for c in self._spill] if self._spill is not None else None,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.columns = [c.to(self.device) for c in state["columns"]] if state["columns"] is not None else None
        self.read = state["read"]
        self.capacity = len(self.columns[0]) if self.columns is not None else self.capacity
        if "pulled" in state:
            self.pulled = state["pulled"]
        else:
            self.limit = None  # a checkpoint from before the limit: resume as it was running
        self._spill = tuple(state["spill"]) if state["spill"] is not None else None
        self.generator.set_state(state["generator"])

    def next_batch(self) -> Columns:
        exhausted = self.limit is not None and self.pulled >= self.limit
        if exhausted and self.read + self.batch_size > self.capacity:
            # Everything planned is read and yet a batch is asked for: the trainer skipped a
            # non-finite step and makes it up on fresh activations. Pull just that batch.
            self.limit, exhausted = self.pulled + self.batch_size, False
        if self.columns is None or (self.read >= self.capacity // 2 and not exhausted):
            self._refill()
        i = self.read
        self.read += self.batch_size
        return tuple(col[i : i + self.batch_size] for col in self.columns)
