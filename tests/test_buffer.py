"""The activation buffer: shuffled, seeded, every activation used once, refilled at half."""

from __future__ import annotations

import pytest
import torch

from saesweep.buffer import ActivationBuffer


def counting_source(chunk: int = 7, paired: bool = False):
    """Chunks of consecutive integers (as 1-wide activations), like LM batches of uneven size."""
    start = 0
    while True:
        x = torch.arange(start, start + chunk, dtype=torch.float32)[:, None]
        yield (x, -x) if paired else (x,)
        start += chunk


def drain(buffer: ActivationBuffer, steps: int) -> list[float]:
    return [v for _ in range(steps) for v in buffer.next_batch()[0].flatten().tolist()]


def test_every_activation_is_handed_out_at_most_once_and_in_shuffled_order():
    buf = ActivationBuffer(counting_source(), capacity=64, batch_size=8, device=torch.device("cpu"),
                           generator=torch.Generator().manual_seed(0))
    seen = drain(buf, 40)  # 320 tokens: five refills
    assert len(seen) == len(set(seen)) == 320
    assert seen[:8] != sorted(seen[:8])
    # nothing is skipped: all but what is still buffered has been seen
    assert set(range(int(max(seen)) + 1)) - set(seen) <= set(buf.columns[0].flatten().tolist())


def test_refill_happens_when_half_is_read():
    pulled = []

    def source():
        for chunk in counting_source(chunk=4):
            pulled.append(len(chunk[0]))
            yield chunk

    buf = ActivationBuffer(source(), capacity=32, batch_size=4, device=torch.device("cpu"),
                           generator=torch.Generator().manual_seed(0))
    drain(buf, 1)
    assert sum(pulled) == 32
    drain(buf, 3)  # 16 read = half: the next batch triggers a refill of 16
    assert sum(pulled) == 32
    drain(buf, 1)
    assert sum(pulled) == 48


def test_paired_columns_stay_aligned_and_seed_fixes_the_order():
    def make(seed):
        return ActivationBuffer(counting_source(paired=True), capacity=32, batch_size=8,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))

    buf = make(1)
    for _ in range(10):
        x, y = buf.next_batch()
        assert torch.equal(y, -x)
    assert drain(make(1), 6) == drain(make(1), 6)
    assert drain(make(1), 6) != drain(make(2), 6)


def test_capacity_must_hold_two_batches():
    with pytest.raises(ValueError):
        ActivationBuffer(counting_source(), capacity=8, batch_size=8, device=torch.device("cpu"),
                         generator=torch.Generator())
