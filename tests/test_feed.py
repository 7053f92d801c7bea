"""The activation feed off the step's critical path (issue 17, item 4): cache shards in the
activation dtype, cache reads prefetched on a thread, a buffer sized from memory.

In-process on the tiny model (conftest.tiny_lm); what a GPU adds (pinned memory, a side
stream) runs here as its CPU no-op, and its speed is measured by benchmarks/bench_feed.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TINY_RUN, composed

from saesweep.activations.cache import cache_hooks, cache_token_rows, ensure_cache
from saesweep.activations.source import ActivationSource
from saesweep.config.schema import validate
from saesweep.data.rows import load_token_rows
from saesweep.lm.model import load_model

SMALL = ["activations.cache_tokens=2048"]  # for the tests that only build and read


def config(tiny_lm, acts_dir, *overrides: str):
    return validate(composed("train", [*tiny_lm, *TINY_RUN, f"activations.cache_dir={acts_dir}", *overrides]))


@pytest.fixture(scope="module")
def bf16_model(tiny_config):
    return load_model(dataclasses.replace(tiny_config.model, dtype="bfloat16"), torch.device("cpu"), None)


@pytest.fixture(scope="module")
def rows(tiny_model, tiny_config):
    return load_token_rows(tiny_config.dataset, tiny_model.tokenizer, 24, tiny_config.training.seed)


def shard_bytes(cache) -> int:
    return sum((cache.path / s["file"]).stat().st_size for s in cache.manifest["shards"])


# --------------------------------------------------------------------------- the cache's dtype


def test_a_bf16_cache_stores_bf16_in_half_the_bytes_and_is_never_mixed_with_fp32(
    tiny_lm, tiny_model, bf16_model, rows, tmp_path
):
    acts = tmp_path / "acts"
    fp32_cfg = config(tiny_lm, acts, *SMALL)
    bf16_cfg = config(tiny_lm, acts, *SMALL, "model.dtype=bfloat16")
    fp32 = ensure_cache(fp32_cfg, tiny_model, rows)
    assert ensure_cache(bf16_cfg, bf16_model, rows, build=False) is None  # the fp32 one is not reused
    bf16 = ensure_cache(bf16_cfg, bf16_model, rows)
    assert bf16.key != fp32.key and bf16.manifest["dtype"] == "bfloat16" and fp32.manifest["dtype"] == "float32"
    hooks = cache_hooks(bf16_cfg)
    (stored,) = bf16.load_shard(0, hooks)
    assert stored.dtype == torch.bfloat16
    assert bf16.tokens == fp32.tokens
    # Half the tensor bytes; the files differ only by their headers (checksums, rows).
    assert 0.49 < shard_bytes(bf16) / shard_bytes(fp32) < 0.51
    # They are the bf16 LM's activations, bit for bit: the first shard starts at row 0.
    token_rows = cache_token_rows(bf16_cfg, rows, bf16_model.tokenizer.bos_token_id)
    first = bf16.manifest["shards"][0]["rows"]
    live = ActivationSource.for_hooks(bf16_model, hooks, True).chunk(token_rows[first[0] : first[1]])[0]
    assert torch.equal(stored, live.cpu())
    # The reader hands them out as stored; the buffer converts to the training dtype.
    assert next(bf16.reader(hooks, seed=0))[0].dtype == torch.bfloat16


def test_an_autocast_cache_holds_what_the_lm_emits_under_autocast(tiny_lm, tiny_model, rows, tmp_path):
    """Under bf16 autocast an fp32 GPT-2's residual stream stays fp32 (it sums bf16 block
    outputs in fp32), so the shards stay fp32; their values are autocast's, and so is the key."""
    acts = tmp_path / "acts"
    plain = ensure_cache(config(tiny_lm, acts, *SMALL), tiny_model, rows)
    amp_cfg = config(tiny_lm, acts, *SMALL, "training.autocast=bf16")
    amp = ensure_cache(amp_cfg, tiny_model, rows)
    assert amp.key != plain.key and amp.manifest["dtype"] == "float32"
    hooks = cache_hooks(amp_cfg)
    token_rows = cache_token_rows(amp_cfg, rows, tiny_model.tokenizer.bos_token_id)
    first = amp.manifest["shards"][0]["rows"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        live = ActivationSource.for_hooks(tiny_model, hooks, True).chunk(token_rows[first[0] : first[1]])[0]
    (stored,) = amp.load_shard(0, hooks)
    (unmixed,) = plain.load_shard(0, hooks)
    assert torch.equal(stored, live) and not torch.equal(stored, unmixed)


def test_training_from_a_bf16_cache_matches_a_live_bf16_run(tiny_lm, tmp_path):
    from saesweep.training.loop import train

    results = {}
    for source in ("live", "cache"):
        cfg = config(tiny_lm, tmp_path / "acts", "model.dtype=bfloat16", f"activations.source={source}")
        (tmp_path / source).mkdir()
        results[source] = train(cfg, tmp_path / source)
    assert json.loads((tmp_path / "cache" / "eval.json").read_text())["activation_source"].startswith("cache:")
    # The cache reads the same activations in its own seeded order: the same EV, within noise.
    assert abs(results["cache"]["explained_variance"] - results["live"]["explained_variance"]) <= 0.01, results


# --------------------------------------------------------------------------- prefetched reads


@pytest.fixture(scope="module")
def small_cache(tiny_lm, tiny_model, rows, tmp_path_factory):
    """Five shards of ~400 tokens: reads cross shard and pass boundaries within a few chunks."""
    acts = tmp_path_factory.mktemp("prefetch") / "acts"
    cfg = config(tiny_lm, acts, *SMALL, "activations.shard_mb=0.05", "activations.batch_rows=2")
    cache = ensure_cache(cfg, tiny_model, rows)
    assert len(cache.manifest["shards"]) >= 4
    return cache, cache_hooks(cfg)


def take(reader, n: int) -> list[torch.Tensor]:
    return [next(reader)[0] for _ in range(n)]


def test_a_prefetched_reader_hands_out_the_synchronous_chunks_and_counts_only_what_it_handed_out(small_cache):
    import time

    cache, hooks = small_cache
    n = 3 * len(cache.manifest["shards"])  # over two passes: shards of ~400 tokens, one chunk each
    sync = take(cache.reader(hooks, seed=3), n)
    ahead = cache.reader(hooks, seed=3, prefetch=2)
    first = take(ahead, 2)
    time.sleep(0.5)  # the thread has read ahead as far as the queue allows
    handed = sum(len(c) for c in first)
    assert ahead.position == handed  # not what sits in the queue
    assert ahead.state_dict()["activation_cache"]["position"] == handed
    rest = take(ahead, n - 2)
    ahead.close()
    assert all(torch.equal(a, b) for a, b in zip(sync, first + rest))
    # Resume mid-pass from the consumed position: the same chunks as an uninterrupted reader.
    resumed = cache.reader(hooks, seed=3, position=handed, prefetch=2)
    assert all(torch.equal(a, b) for a, b in zip(sync[2:], take(resumed, n - 2)))
    resumed.close()


def test_the_prefetch_queue_is_bounded_and_close_stops_the_thread():
    from saesweep.activations.prefetch import Prefetcher

    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield (torch.tensor([i]),)

    ahead = Prefetcher(items(), depth=3)
    assert next(ahead)[0].item() == 0
    import time

    time.sleep(0.3)
    # One handed out, three queued, at most one more made and waiting to be queued.
    assert 4 <= len(produced) <= 5
    ahead.close()
    assert not ahead._thread.is_alive()


def test_a_corrupt_shard_raises_the_same_error_through_the_prefetch_thread(small_cache, tmp_path):
    import shutil

    from saesweep.activations.cache import load_manifest
    from saesweep.errors import UserError

    cache, hooks = small_cache
    copy = tmp_path / cache.path.name
    shutil.copytree(cache.path, copy)
    damaged = load_manifest(copy)
    for shard in damaged.manifest["shards"]:
        path = copy / shard["file"]
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF  # in the last tensor's bytes: the checksum catches it
        path.write_bytes(bytes(data))
    errors = []
    for prefetch in (0, 2):
        with pytest.raises(UserError) as caught:
            next(damaged.reader(hooks, seed=0, prefetch=prefetch))
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "checksum mismatch" in errors[0]


def test_training_with_prefetched_cache_reads_equals_synchronous_reads(tiny_lm, tmp_path):
    from conftest import weights

    from saesweep.training.loop import train

    for prefetch in (0, 3):
        cfg = config(
            tiny_lm,
            tmp_path / "acts",
            "training.total_tokens=4096",
            "activations.source=cache",
            f"activations.prefetch_chunks={prefetch}",
        )
        (tmp_path / str(prefetch)).mkdir()
        train(cfg, tmp_path / str(prefetch))
    want, got = weights(tmp_path / "0"), weights(tmp_path / "3")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


# --------------------------------------------------------------------------- buffer.size_tokens=auto


def test_auto_buffer_size_is_what_fits_at_the_refill_peak_in_whole_batches():
    from saesweep.training.buffer_size import AUTO_MAX_TOKENS, auto_buffer_tokens

    # (10 MB free - 2 MB of SAEs) x 3/4 headroom / 2.5 copies = 2.4 MB = 18,750 tokens of 128 B,
    # rounded down to batches of 64: 292 x 64.
    assert auto_buffer_tokens(10_000_000, 2_000_000, 128, 64, 10**9) == 18_688
    # The run needs only 10,000 tokens: 157 batches hold them.
    assert auto_buffer_tokens(10_000_000, 2_000_000, 128, 64, 10_000) == 10_048
    # Nothing free after the SAEs: still two batches (the buffer's minimum).
    assert auto_buffer_tokens(1_000_000, 2_000_000, 128, 64, 10**9) == 128
    # Plenty of memory: at most AUTO_MAX_TOKENS.
    assert auto_buffer_tokens(10**12, 0, 4, 64, 10**9) == AUTO_MAX_TOKENS


def test_auto_buffer_sets_the_sae_state_aside_and_a_number_is_kept(tiny_config, monkeypatch):
    from saesweep.training import buffer_size

    cfg = dataclasses.replace(tiny_config, buffer=dataclasses.replace(tiny_config.buffer, size_tokens="auto"))
    monkeypatch.setattr(buffer_size, "free_memory", lambda device: 64 * 2**20)
    state = buffer_size.sae_state_bytes([cfg, cfg], 32, 32)
    # Two d_in 32 x d_sae TopK SAEs: W_enc, W_dec, b_enc, b_dec in fp32, four copies each,
    # plus a few per-latent buffers.
    d_sae = 32 * cfg.sae.expansion_factor
    weights = 32 * d_sae * 2 + d_sae + 32
    assert 2 * weights * 4 * 4 <= state <= 2 * (weights * 4 * 4 + d_sae * 8 * 4)
    got = buffer_size.buffer_capacity([cfg, cfg], [32], torch.device("cpu"), 1024, 8192)
    assert got == buffer_size.auto_buffer_tokens(64 * 2**20, state, 32 * 4, 1024, 8192) == 8192
    assert buffer_size.buffer_capacity([tiny_config], [32], torch.device("cpu"), 1024, 8192) == 65536


def test_auto_is_a_valid_buffer_size_and_other_words_are_refused(tiny_lm):
    from saesweep.errors import UserError

    assert validate(composed("train", ["buffer.size_tokens=auto"])).buffer.size_tokens == "auto"
    with pytest.raises(UserError) as refused:
        validate(composed("train", ["buffer.size_tokens=big"]))
    assert str(refused.value) == (
        "config key 'buffer.size_tokens': must be > 0 or auto (from the training device's free memory), got 'big'"
    )


def test_a_run_with_an_auto_buffer_trains(tiny_lm, tmp_path):
    from saesweep.training.loop import train

    cfg = config(tiny_lm, tmp_path / "acts", "buffer.size_tokens=auto", "training.total_tokens=4096")
    result = train(cfg, tmp_path)
    assert result["explained_variance"] > 0
