"""The activation buffer: shuffled, seeded, every activation used once, refilled at half."""

from __future__ import annotations

import pytest
import torch

from saesweep.activations.buffer import ActivationBuffer


def counting_source(chunk: int = 7, paired: bool = False):
    """Chunks of consecutive integers (as 1-wide activations), like LM batches of uneven size."""
    start = 0
    while True:
        x = torch.arange(start, start + chunk, dtype=torch.float32)[:, None]
        yield (x, -x) if paired else (x,)
        start += chunk


def recorded(source, pulled: list[int]):
    """`source`, noting each chunk's size in `pulled` as the buffer takes it."""
    for chunk in source:
        pulled.append(len(chunk[0]))
        yield chunk


def drain(buffer: ActivationBuffer, steps: int) -> list[float]:
    return [v for _ in range(steps) for v in buffer.next_batch()[0].flatten().tolist()]


def test_every_activation_is_handed_out_at_most_once_and_in_shuffled_order():
    buf = ActivationBuffer(
        counting_source(),
        capacity=64,
        batch_size=8,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    seen = drain(buf, 40)  # 320 tokens: five refills
    assert len(seen) == len(set(seen)) == 320
    assert seen[:8] != sorted(seen[:8])
    # nothing is skipped: all but what is still buffered has been seen
    assert set(range(int(max(seen)) + 1)) - set(seen) <= set(buf.columns[0].flatten().tolist())


def test_refill_happens_when_half_is_read():
    pulled: list[int] = []
    buf = ActivationBuffer(
        recorded(counting_source(chunk=4), pulled),
        capacity=32,
        batch_size=4,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    drain(buf, 1)
    assert sum(pulled) == 32
    drain(buf, 3)  # 16 read = half: the next batch triggers a refill of 16
    assert sum(pulled) == 32
    drain(buf, 1)
    assert sum(pulled) == 48


def test_paired_columns_stay_aligned_and_seed_fixes_the_order():
    def make(seed):
        return ActivationBuffer(
            counting_source(paired=True),
            capacity=32,
            batch_size=8,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(seed),
        )

    buf = make(1)
    for _ in range(10):
        x, y = buf.next_batch()
        assert torch.equal(y, -x)
    assert drain(make(1), 6) == drain(make(1), 6)
    assert drain(make(1), 6) != drain(make(2), 6)


def test_capacity_must_hold_two_batches():
    with pytest.raises(ValueError):
        ActivationBuffer(
            counting_source(), capacity=8, batch_size=8, device=torch.device("cpu"), generator=torch.Generator()
        )


@pytest.mark.parametrize("steps", [3, 12, 13, 21])  # inside the first fill, at a full refill, between
def test_limit_pulls_exactly_the_tokens_the_run_reads_and_hands_out_each_once(steps):
    pulled: list[int] = []
    buf = ActivationBuffer(
        recorded(counting_source(chunk=5), pulled),
        capacity=32,
        batch_size=4,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        limit=steps * 4,
    )
    seen = drain(buf, steps)
    # Tokens 0..limit-1, each once: nothing computed that no step trains on, nothing skipped.
    assert sorted(seen) == list(range(steps * 4))
    assert buf.pulled == steps * 4 and sum(pulled) < steps * 4 + 5  # the last chunk's excess only
    # A step skipped as non-finite is made up: one batch past the limit, fresh tokens.
    seen += drain(buf, 2)
    assert sorted(seen) == list(range((steps + 2) * 4)) and buf.pulled == (steps + 2) * 4


def test_a_resumed_limited_buffer_hands_out_the_same_batches():
    def make():
        return ActivationBuffer(
            counting_source(chunk=3),
            capacity=16,
            batch_size=4,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(3),
            limit=36,
        )

    whole = drain(make(), 9)
    first = make()
    head = drain(first, 7)
    assert first.capacity == 12  # the 7th batch came after the last refill, which shrank the buffer
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + drain(resumed, 2) == whole


def test_a_resumed_buffer_past_its_limit_hands_out_the_same_batches():
    """Skipped steps made up beyond the limit, with a checkpoint taken past it."""

    def make(source=None):
        return ActivationBuffer(
            source or counting_source(chunk=3),
            capacity=16,
            batch_size=4,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(3),
            limit=36,
        )

    whole = drain(make(), 12)  # 9 planned batches and 3 made up
    first = make()
    head = drain(first, 10)
    resumed = make(first.source)  # the feed resumes where it was, as the trainer's does
    resumed.load_state_dict(first.state_dict())
    assert head + drain(resumed, 2) == whole
    assert sorted(whole) == list(range(48))


def test_the_live_feed_runs_the_lm_only_on_the_rows_the_run_trains_on(smollm2):
    """The last LM pass stops at the rows holding the tokens still needed, not a whole batch of rows."""
    from saesweep.activations.source import ActivationSource, LiveFeed
    from saesweep.config.schema import TrainConfig
    from saesweep.data.rows import load_token_rows

    cfg = TrainConfig()
    rows = load_token_rows(cfg.dataset, smollm2.tokenizer, 8, cfg.training.seed)
    source = ActivationSource(smollm2, "blocks.6.hook_resid_post", None, exclude_bos=True)
    feed = LiveFeed(source, rows, batch_rows=8)
    buf = ActivationBuffer(
        feed,
        capacity=128,
        batch_size=64,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        limit=5 * 64,
    )
    handed = torch.cat([buf.next_batch()[0].clone() for _ in range(5)])  # batches are views a refill overwrites

    first = [r for _, r in zip(range(8), rows.train_iter())]
    kept = torch.stack(first).ne(smollm2.tokenizer.bos_token_id).sum(1).cumsum(0)
    needed = int((kept < 5 * 64).sum()) + 1  # rows holding the first 320 trainable tokens
    assert needed < 8 and feed.rows_consumed == needed
    # Those rows' activations, each handed out once (in shuffled order).
    expected = source.chunk(torch.stack(first[:needed]))[0][: 5 * 64]
    project = torch.randn(expected.shape[1], generator=torch.Generator().manual_seed(1))
    assert torch.allclose((handed @ project).sort().values, (expected @ project).sort().values, atol=1e-2)
    # A skipped step made up past the limit takes just the rows it needs too.
    buf.next_batch()
    assert feed.rows_consumed == int((kept < 6 * 64).sum()) + 1


def budgeted_source(chunk: int, calls: list):
    """A source that can stop short, like the live feed; records every call's budget."""

    class Feed:
        start = 0

        def __iter__(self):
            return self

        def __next__(self):
            return self.next_chunk(None)

        def next_chunk(self, budget):
            calls.append(budget)
            n = chunk if budget is None else min(chunk, budget)
            x = torch.arange(self.start, self.start + n, dtype=torch.float32)[:, None]
            self.start += n
            return (x, -x)

    return Feed()


def overlapped(overlap: bool, calls: list, chunk: int = 5, limit: int | None = 203, capacity: int = 48):
    return ActivationBuffer(
        budgeted_source(chunk, calls),
        capacity=capacity,
        batch_size=8,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(3),
        limit=limit,
        overlap=overlap,
    )


@pytest.mark.parametrize("chunk, limit", [(5, 203), (13, None), (64, 200)])
def test_refills_pulled_ahead_give_the_plain_buffers_batches_bit_for_bit(chunk, limit):
    """The overlapped buffer (a refill's fresh half pulled while the other half is read; on a
    GPU on a side stream) hands out the same batches from the same source calls, through
    the last, shrinking refill before the limit and a batch made up past it."""
    plain_calls, ahead_calls = [], []
    plain, ahead = overlapped(False, plain_calls, chunk, limit), overlapped(True, ahead_calls, chunk, limit)
    steps = 27  # past the limit of 203 tokens (25 batches): two made-up batches
    for step in range(steps):
        want, got = plain.next_batch(), ahead.next_batch()
        assert all(torch.equal(a, b) for a, b in zip(want, got)), step
        assert torch.equal(got[0], -got[1])
    # The same calls with the same budgets; the overlapped one may be pulling the next refill.
    assert ahead_calls[: len(plain_calls)] == plain_calls
    if limit is not None:
        assert ahead_calls == plain_calls  # nothing beyond the limit and the made-up batches


def test_a_refill_is_pulled_while_the_half_before_it_is_read():
    plain_calls, ahead_calls = [], []
    plain, ahead = overlapped(False, plain_calls, limit=None), overlapped(True, ahead_calls, limit=None)
    for buf in (plain, ahead):
        buf.next_batch()  # the first fill: 48 tokens
    first = len(plain_calls)
    assert len(ahead_calls) == first
    for _ in range(2):  # 24 of 48 read: the next batch refills
        plain.next_batch()
        ahead.next_batch()
    assert len(plain_calls) == first  # the plain buffer pulls only when the refill is due
    assert sum(len(p[0]) for p in ahead._pending) >= 16  # the overlapped one has most of it already
    assert ahead.pulled == plain.pulled  # counted once the refill takes it


def test_a_buffer_resumed_with_chunks_pulled_ahead_hands_out_the_same_batches():
    calls: list = []
    straight = overlapped(True, calls)
    want = [straight.next_batch() for _ in range(20)]
    interrupted = overlapped(True, [])
    for _ in range(6):  # mid-way through pulling a refill ahead
        interrupted.next_batch()
    assert interrupted._pending
    state = interrupted.state_dict()
    source_position = interrupted.source.start
    resumed = overlapped(True, [])
    resumed.source.start = source_position  # the feed resumes from its own checkpointed position
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(14)]
    for a, b in zip(want[6:], got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
