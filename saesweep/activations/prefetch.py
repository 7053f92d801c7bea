"""Read ahead on a background thread, so disk reads and checksums overlap the training step.

`Prefetcher` runs an iterator on a daemon thread and keeps at most `depth` of its items
waiting in a bounded queue. The consumer sees the same items in the same order, and the
same exception the iterator raised, where it would have raised it; everything it counts
(a reader's position) it counts on consumption, so a checkpoint never includes what was
only read ahead. With `pin` the items' tensors are copied into page-locked memory on the
thread, so that the buffer's non-blocking copies to a GPU really run asynchronously.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Iterator

import torch

_POLL_S = 0.1  # how often a thread blocked on a full queue checks whether it should stop

Columns = tuple[torch.Tensor, ...]


def _produce(items: Iterator[Columns], out: queue.Queue, stop: threading.Event, pin: bool) -> None:
    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if pin:
                item = tuple(t.pin_memory() for t in item)
            if not put(("item", item)):
                return
        put(("end", None))
    except BaseException as e:  # handed to the consumer, raised there
        put(("error", e))


class Prefetcher:
    """`items`, read up to `depth` ahead on a thread. Close it (or drop it) to stop the thread."""

    def __init__(self, items: Iterator[Columns], depth: int, pin: bool = False, name: str = "saesweep-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth {depth} must be at least 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._last: tuple[str, Any] | None = None  # the end or error, once reached: raised again on each call
        # The thread holds the iterator, the queue and the event, never self: dropping the
        # Prefetcher stops it (the finalizer) even where nobody calls close().
        self._thread = threading.Thread(target=_produce, args=(items, self._queue, self._stop, pin), name=name)
        self._thread.daemon = True
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._thread.start()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Columns:
        kind, value = self._last or self._queue.get()
        if kind == "item":
            return value
        self._last = (kind, value)
        if kind == "end":
            raise StopIteration
        raise value

    def close(self) -> None:
        """Stop the thread and drop what it read ahead; waits at most a poll interval or
        the read in progress."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()
