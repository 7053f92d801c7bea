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

With `overlap`, the next refill's fresh half is pulled while the current half is read: a
chunk at a time at the start of `next_batch` (after the previous step is queued), paced so
that it is complete when the refill is due, on a side CUDA stream whose work the refill
waits for (its tensors marked as used by the training stream, so the allocator never hands
their memory out early). On the CPU the stream is a no-op and the pulls happen earlier but
in the same sequence with the same budgets, so the batches are bit for bit those of the
plain buffer; a checkpoint carries what was pulled ahead.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

Columns = tuple[torch.Tensor, ...]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, without the host waiting for the device: a copy to a GPU from
    pageable memory without non_blocking waits for all the work queued on its stream first."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class SideStream:
    """Where fresh activations are made: a CUDA side stream, or (on the CPU) nothing at all."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._started = False

    def __call__(self) -> Any:
        """A context in which work is queued on the side stream."""
        if self.stream is None:
            return contextlib.nullcontext()
        if not self._started:
            # Once, so that the LM's weights (placed by the training stream) are in place.
            # Later pulls read nothing the training stream writes: they need not wait for
            # its steps, and so run beside them.
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            self._started = True
        return torch.cuda.stream(self.stream)

    def hand_over(self, tensors: list[torch.Tensor]) -> None:
        """Make the training stream wait for the side stream's work on `tensors`, and keep
        their memory from reuse until the training stream is done with them."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)
        for t in tensors:
            t.record_stream(current)


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
        overlap: bool = False,
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
        self.pulled = 0  # tokens taken from the source so far (the pending ones once complete)
        self.overlap = overlap
        self._side = SideStream(device)
        self._pending: list[Columns] = []  # the next refill's chunks, pulled ahead (overlap)

    def _room(self, n: int) -> int:
        return n if self.limit is None else min(n, self.limit - self.pulled)

    def _take(self, n: int) -> list[torch.Tensor]:
        """n tokens from the source, keeping any excess for the next call."""
        parts: list[Columns] = []
        have = 0
        while have < n:
            parts.append(self._pull(n - have, have))
            have += len(parts[-1][0])
        self.pulled += n
        return [torch.cat(col) for col in zip(*parts)]

    def _pull(self, need: int, have: int) -> Columns:
        """The source's next chunk (or the spill of the last), at most `need` tokens of it."""
        chunk = self._spill if self._spill is not None else self._next_chunk(have)
        self._spill = None
        chunk = tuple(c.to(self.device, self.dtype, non_blocking=True) for c in chunk)
        if len(chunk[0]) > need:
            self._spill = tuple(c[need:] for c in chunk)
            chunk = tuple(c[:need] for c in chunk)
        return chunk

    def _refill_point(self) -> int:
        """Rows read when the next refill is due: the first count of whole batches that
        reaches half the capacity. The refill takes that many tokens, within the limit."""
        return -(-(self.capacity // 2) // self.batch_size) * self.batch_size

    def _pending_tokens(self) -> int:
        return sum(len(p[0]) for p in self._pending)

    def _pull_ahead(self) -> None:
        """Pull chunks of the next refill until the share due by now is in (overlap)."""
        point = self._refill_point()
        target = self._room(point)
        due = target * min(1.0, (self.read + self.batch_size) / point)
        with self._side():
            while (have := self._pending_tokens()) < due:
                self._pending.append(self._pull(target - have, have))

    def _take_fresh(self, n: int) -> list[torch.Tensor]:
        """The refill's n fresh tokens: what was pulled ahead, completed on the spot."""
        if not self.overlap:
            return self._take(n)
        with self._side():
            while (have := self._pending_tokens()) < n:
                self._pending.append(self._pull(n - have, have))
            fresh = [torch.cat(col) for col in zip(*self._pending)]
        if self._pending_tokens() != n:
            raise RuntimeError(f"pulled {self._pending_tokens()} tokens ahead for a refill of {n}")
        self._side.hand_over(fresh)
        self._pending = []
        self.pulled += n
        return fresh

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
            fresh = self._take_fresh(n)
            for col, new in zip(self.columns, fresh):
                col[:keep] = col[self.read :].clone()
                col[keep:] = new
        else:
            # The last refill before the limit: the buffer shrinks to the unread tail plus what is left.
            fresh = self._take_fresh(n)
            self.columns = [torch.cat([col[self.read :], new]) for col, new in zip(self.columns, fresh)]
            self.capacity = len(self.columns[0])
        perm = to_device(torch.randperm(self.capacity, generator=self.generator), self.device)
        self.columns = [col[perm] for col in self.columns]
        self.read = 0

    def sample(self) -> Columns:
        """The first fill, for data-dependent initialisation."""
        if self.columns is None:
            self._refill()
        return tuple(self.columns)

    def state_dict(self) -> dict:
        """Contents, read position, leftover source chunk, what was pulled ahead and the
        generator: all a resume needs."""
        self._side.hand_over([])  # the side stream's pulls are complete before they are copied
        return {
            "columns": [c.cpu() for c in self.columns] if self.columns is not None else None,
            "read": self.read,
            "pulled": self.pulled,
            "spill": [c.cpu() for c in self._spill] if self._spill is not None else None,
            "generator": self.generator.get_state(),
            "pending": [[c.cpu() for c in chunk] for chunk in self._pending],
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
        self._pending = [tuple(c.to(self.device) for c in chunk) for chunk in state.get("pending", [])]
        self.generator.set_state(state["generator"])

    def next_batch(self) -> Columns:
        exhausted = self.limit is not None and self.pulled >= self.limit
        if exhausted and self.read + self.batch_size > self.capacity:
            # Everything planned is read and yet a batch is asked for: the trainer skipped a
            # non-finite step and makes it up on fresh activations. Pull just that batch.
            self.limit, exhausted = self.pulled + self.batch_size, False
        if self.columns is None or (self.read >= self.capacity // 2 and not exhausted):
            self._refill()
        elif self.overlap and not exhausted:
            self._pull_ahead()
        i = self.read
        self.read += self.batch_size
        return tuple(col[i : i + self.batch_size] for col in self.columns)
