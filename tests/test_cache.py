"""The shared activation cache: keys, atomic shards, locking, resume, corruption, training from it.

Everything runs the real CLI (or the real model in-process) on a few thousand tokens.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_RUN, composed, metrics_without_timing, run_cli, weights

from saesweep.activations.cache import (
    activation_spec,
    cache_key,
    ensure_cache,
    load_manifest,
    open_training_feed,
)
from saesweep.config.schema import TrainConfig
from saesweep.errors import UserError

# The CLI tests run on the tiny model (conftest.tiny_lm): ~2,000 of its tokens a shard, so
# 8,192 tokens make 5 shards.
SHARDS = ["activations.shard_mb=0.25"]


@pytest.fixture(scope="module")
def cli(tiny_lm) -> list[str]:
    return [*tiny_lm, *TINY_RUN]


@pytest.fixture(scope="module")
def run(cli) -> list[str]:
    return [*cli, "training.checkpoint_every_tokens=2048", "sae.k=16"]


def tiny_config(acts_dir) -> TrainConfig:
    """The typed config that TINY_RUN gives, as far as the activation spec is concerned."""
    cfg = TrainConfig()
    cfg.training.total_tokens = 8192
    cfg.activations.batch_rows = 16
    cfg.activations.shard_mb = 4
    cfg.activations.cache_dir = str(acts_dir)
    return cfg


def only_cache(path):
    """The single cache (key dir) under an activations dir."""
    (found,) = [p for p in path.iterdir() if p.is_dir()]
    return found


@pytest.fixture(scope="module")
def built(cli, tmp_path_factory):
    """A cache built with `python -m saesweep.cache`, and what the CLI printed."""
    root = tmp_path_factory.mktemp("cache-cli")
    acts = root / "acts"
    proc = run_cli("saesweep.cache", *cli, *SHARDS, f"activations.cache_dir={acts}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cache built" in proc.stdout + proc.stderr
    return only_cache(acts), proc.stdout


@pytest.fixture(scope="module")
def built_here(smollm2, tiny_rows, tmp_path_factory):
    """The same cache as `built`, built in this process (for the tests that only read one)."""
    return ensure_cache(tiny_config(tmp_path_factory.mktemp("cache-here") / "acts"), smollm2, tiny_rows)


@pytest.fixture(scope="module")
def tiny_rows(smollm2):
    from saesweep.data.rows import load_token_rows

    cfg = TrainConfig()
    return load_token_rows(cfg.dataset, smollm2.tokenizer, 24, cfg.training.seed)


@pytest.fixture(scope="module")
def cache_run(run, built, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cache-run")
    proc = run_cli(
        "saesweep.train",
        *run,
        "activations.source=cache",
        f"activations.cache_dir={built[0].parent}",
        f"hydra.run.dir={run_dir}",
        cwd=run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- keys


@pytest.mark.slow
def test_cli_prints_the_dir_and_key_and_the_manifest_lists_checksummed_shards(cli, built, tiny_model):
    from saesweep.config.schema import validate
    from saesweep.data.rows import load_token_rows

    path, stdout = built
    assert f"cache dir: {path}" in stdout and f"key: {path.name}" in stdout
    # The CLI (another process) got the key this process computes for the same config.
    cfg = validate(composed("train", [*cli, *SHARDS, f"activations.cache_dir={path.parent}"]))
    rows = load_token_rows(cfg.dataset, tiny_model.tokenizer, cfg.eval.rows, cfg.training.seed)
    assert path.name == ensure_cache(cfg, tiny_model, rows, build=False).key
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == path.name == cache_key(manifest["spec"])
    assert len(manifest["shards"]) == 5
    assert manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"]) >= 8192
    assert [s["rows"] for s in manifest["shards"]][0][0] == 0
    assert not list(path.glob(".*.tmp"))


def test_key_is_stable_and_sensitive_to_every_field(smollm2, tiny_rows, tmp_path):
    from saesweep.activations.cache import cache_hooks, cache_token_rows

    cfg = tiny_config(tmp_path)
    bos = smollm2.tokenizer.bos_token_id
    rows = cache_token_rows(cfg, tiny_rows, bos)
    spec = activation_spec(cfg, smollm2, rows, cache_hooks(cfg))
    assert cache_key(spec) == cache_key(activation_spec(cfg, smollm2, rows.clone(), cache_hooks(cfg)))
    assert cache_key(json.loads(json.dumps(spec))) == cache_key(spec)  # key order does not matter

    def key_with(**changes) -> str:
        c = tiny_config(tmp_path)
        for dotted, value in changes.items():
            section, name = dotted.split("__")
            setattr(getattr(c, section), name, value)
        r = cache_token_rows(c, tiny_rows, bos)
        return cache_key(activation_spec(c, smollm2, r, cache_hooks(c)))

    base = cache_key(spec)
    # Keys added later enter the spec only when set, so caches built before them keep their key.
    assert "exclude_special_tokens" not in spec and "seqpos_slice" not in spec
    assert "disable_concat_sequences" not in spec["dataset"]
    changed = {
        "hook": key_with(model__hook_point="blocks.5.hook_resid_post"),
        "extra hook": key_with(activations__cache_hooks=["blocks.3.hook_resid_post"]),
        "transcoder target": key_with(model__hook_point_out="blocks.7.hook_resid_post"),
        "model name": key_with(model__name="other"),
        "dtype": key_with(model__dtype="bfloat16"),
        "autocast": key_with(training__autocast="bf16"),
        "tokens": key_with(training__total_tokens=16384),
        "cache tokens": key_with(activations__cache_tokens=4096),
        "exclude_bos": key_with(activations__exclude_bos=False),
        "special tokens": key_with(activations__exclude_special_tokens=True),
        "positions": key_with(activations__seqpos_slice=[1, None]),  # the same rows: 127 a row either way
        "dataset path": key_with(dataset__path="elsewhere"),
        "holdout": key_with(dataset__holdout_fraction=0.1),
        "windowing": key_with(dataset__sequence_separator_token="eos"),
        "no concatenation": key_with(dataset__disable_concat_sequences=True),
    }
    assert all(k != base for k in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
    # Neither where the cache lives nor the shard size, the seed or the SAE changes what is cached.
    same = tiny_config(tmp_path / "elsewhere")
    same.activations.shard_mb = 64
    same.training.seed = 7
    same.training.batch_size = 512
    assert cache_key(activation_spec(same, smollm2, cache_token_rows(same, tiny_rows, bos), cache_hooks(same))) == base

    # Token rows: content, not just count.
    other_rows = rows.clone()
    other_rows[3, 5] += 1
    assert cache_key(activation_spec(cfg, smollm2, other_rows, cache_hooks(cfg))) != base

    # Weights: a change up to the hook's block matters, one after it cannot.
    for name, expect_change in (("blocks.6.mlp.b_out", True), ("blocks.7.mlp.b_out", False), ("embed.W_E", True)):
        param = dict(smollm2.named_parameters())[name]
        with torch.no_grad():
            param.view(-1)[0] += 1.0
            try:
                k = cache_key(activation_spec(cfg, smollm2, rows, cache_hooks(cfg)))
            finally:
                param.view(-1)[0] -= 1.0
        assert (k != base) == expect_change, name


# --------------------------------------------------------------------------- reading


def test_reader_is_a_seeded_permutation_per_pass_and_resumes_from_a_position(built_here):
    cache = load_manifest(built_here.path)
    hooks = cache.manifest["hooks"]
    total = cache.tokens

    def take(reader, n):
        parts, have = [], 0
        while have < n:
            chunk = next(reader)[0]
            parts.append(chunk)
            have += len(chunk)
        return torch.cat(parts)[:n]

    one_pass = take(cache.reader(hooks, seed=1), total)
    stored = torch.cat([cache.load_shard(i, hooks)[0] for i in range(len(cache.manifest["shards"]))])
    # Every token exactly once per pass, in an order that mixes shards.
    assert torch.allclose(one_pass.double().sum(0), stored.double().sum(0))
    assert torch.equal(torch.sort(one_pass[:, 0]).values, torch.sort(stored[:, 0]).values)
    first_shard = cache.manifest["shards"][0]["tokens"]
    assert not torch.equal(one_pass[:first_shard], stored[:first_shard])
    assert not torch.equal(take(cache.reader(hooks, seed=2), 512), one_pass[:512])

    # A reader started at a position continues exactly where another one was.
    straight = cache.reader(hooks, seed=1)
    both = take(straight, total + 3000)  # into the second pass
    for position in (0, 777, total - 5, total + 100):
        again = take(cache.reader(hooks, seed=1, position=position), 1500)
        assert torch.equal(again, both[position : position + 1500]), position
    assert not torch.equal(both[total : total + 512], both[:512])  # the second pass is reshuffled


def test_auto_trains_live_without_a_cache_and_reads_a_complete_one(built_here, smollm2, tiny_rows, tmp_path):
    from saesweep.activations.source import ActivationSource, LiveFeed

    source = ActivationSource(smollm2, "blocks.6.hook_resid_post", None, True)
    cfg = tiny_config(tmp_path / "empty")
    cfg.activations.source = "auto"
    assert isinstance(open_training_feed(cfg, smollm2, source, tiny_rows, None), LiveFeed)
    assert not (tmp_path / "empty").exists()  # a single run does not build
    cfg.activations.cache_dir = str(built_here.path.parent)
    feed = open_training_feed(cfg, smollm2, source, tiny_rows, None)
    assert feed.name == f"cache:{built_here.key}"
    # A resumed run keeps the source it started with.
    assert isinstance(open_training_feed(cfg, smollm2, source, tiny_rows, {"rows_consumed": 3}), LiveFeed)


def test_unwritable_cache_dir_is_a_one_line_error(smollm2, tiny_rows, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = tiny_config(blocker / "acts")
    with pytest.raises(UserError, match=r"activation cache dir .*a-file/acts is not writable") as e:
        ensure_cache(cfg, smollm2, tiny_rows)
    assert "\n" not in str(e.value)


def test_one_pass_caches_several_hooks_and_they_equal_live_activations(smollm2, tiny_rows, tmp_path):
    """A cache for a transcoder (6 -> 7) that also stores layer 3: one LM pass, three hooks."""
    from saesweep.activations.cache import cache_token_rows
    from saesweep.activations.source import ActivationSource

    cfg = tiny_config(tmp_path)
    cfg.activations.cache_tokens = 600  # 5 rows
    cfg.activations.batch_rows = 2
    cfg.activations.shard_mb = 0.001  # one LM batch a shard: 3 shards
    cfg.model.hook_point_out = "blocks.7.hook_resid_post"
    cfg.activations.cache_hooks = ["blocks.3.hook_resid_post"]
    cache = ensure_cache(cfg, smollm2, tiny_rows)
    hooks = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post", "blocks.7.hook_resid_post"]
    assert cache.manifest["hooks"] == hooks and len(cache.manifest["shards"]) == 3
    stored = [torch.cat(c) for c in zip(*(cache.load_shard(i, hooks) for i in range(3)))]
    rows = cache_token_rows(cfg, tiny_rows, smollm2.tokenizer.bos_token_id)
    live = ActivationSource.for_hooks(smollm2, hooks, exclude_bos=True).chunk(rows)
    # The cache runs the LM 2 rows at a time, the live source all 5 at once: fp32 matmuls of
    # other shapes round differently, ~1e-5 relative after 7 layers. A wrong hook or row
    # order differs by O(1).
    for hook, got, want in zip(hooks, stored, live):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=hook)
    # A transcoder reads its (input, target) pair from it, aligned token by token.
    x, target = next(cache.reader(["blocks.6.hook_resid_post", "blocks.7.hook_resid_post"], seed=0))
    pairs = {tuple(a[:4].tolist()): b for a, b in zip(stored[1], stored[2])}
    for a, b in zip(x[:50], target[:50]):
        assert torch.equal(pairs[tuple(a[:4].tolist())], b)
    # The same config finds it again without building.
    assert ensure_cache(cfg, smollm2, tiny_rows, build=False).key == cache.key


# --------------------------------------------------------------------------- training from it


@pytest.mark.slow
def test_training_from_the_cache_reaches_the_live_ev(run, cache_run, built, tmp_path):
    run_dir, output = cache_run
    assert "cache hit" in output and "building activation cache" not in output
    cached = json.loads((run_dir / "eval.json").read_text())
    assert cached["activation_source"] == f"cache:{built[0].name}"
    live = run_cli("saesweep.train", *run, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert live.returncode == 0, live.stderr[-3000:]
    live_result = json.loads((tmp_path / "eval.json").read_text())
    assert live_result["activation_source"] == "live"
    assert abs(cached["explained_variance"] - live_result["explained_variance"]) <= 0.01, (cached, live_result)


@pytest.mark.slow
def test_killed_cache_run_resumes_to_the_same_weights(run, cache_run, built, tmp_path):
    args = [*run, "activations.source=cache", f"activations.cache_dir={built[0].parent}", f"hydra.run.dir={tmp_path}"]
    crashed = run_cli("saesweep.train", *args, cwd=tmp_path, env={"SAESWEEP_CRASH_AT_STEP": "3"})
    assert crashed.returncode == -signal.SIGKILL
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["activation_cache"]["key"] == built[0].name and checkpoint["activation_cache"]["position"] > 0
    resumed = run_cli("saesweep.train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    want, got = weights(cache_run[0]), weights(tmp_path)
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name
    assert metrics_without_timing(tmp_path) == metrics_without_timing(cache_run[0])


# --------------------------------------------------------------------------- builders


@pytest.mark.slow
def test_corrupt_shard_is_a_one_line_error_naming_the_file(run, built, tmp_path):
    acts = tmp_path / "acts"
    shutil.copytree(built[0], acts / built[0].name)
    shard = acts / built[0].name / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the tensor data
    shard.write_bytes(bytes(data))
    proc = run_cli(
        "saesweep.train",
        *run,
        "activations.source=cache",
        f"activations.cache_dir={acts}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    # The error may come mid-training, after a progress bar line; it is still one line of its own.
    (line,) = [ln for ln in proc.stderr.splitlines() if "error: " in ln]
    message = line[line.index("error: ") :]
    assert message.startswith(f"error: activation cache shard {shard} is corrupt (checksum mismatch"), message
    assert f"delete {acts / built[0].name}" in message
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_killed_build_resumes_from_its_finished_shards(cli, built, tmp_path):
    args = [*cli, *SHARDS, f"activations.cache_dir={tmp_path / 'acts'}"]
    crashed = run_cli("saesweep.cache", *args, cwd=tmp_path, env={"SAESWEEP_CACHE_CRASH_AFTER_SHARDS": "2"})
    assert crashed.returncode == -signal.SIGKILL
    path = tmp_path / "acts" / built[0].name
    assert sorted(p.name for p in path.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (path / "manifest.json").exists()
    assert load_manifest(path) is None  # incomplete: readers would build, never read it

    resumed = run_cli("saesweep.cache", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the activation cache build" in resumed.stdout + resumed.stderr
    want = json.loads((built[0] / "manifest.json").read_text())["shards"]
    got = json.loads((path / "manifest.json").read_text())["shards"]
    assert [(s["rows"], s["sha256"]) for s in got] == [(s["rows"], s["sha256"]) for s in want]


@pytest.mark.slow
def test_two_runs_racing_build_once_and_both_train(run, built, tmp_path):
    """Both runs queue on the build lock (held here), then race for it when it is released."""
    key_dir = tmp_path / "acts" / built[0].name
    key_dir.mkdir(parents=True)
    lock = os.open(key_dir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    procs, logs = [], []
    try:
        for i in range(2):
            log_path = tmp_path / f"run{i}.log"
            logs.append(log_path)
            args = [
                *run,
                *SHARDS,
                "activations.source=cache",
                f"activations.cache_dir={tmp_path / 'acts'}",
                f"hydra.run.dir={tmp_path / f'run{i}'}",
            ]
            with open(log_path, "w") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "saesweep.train", *args],
                        cwd=tmp_path,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=dict(os.environ),
                    )
                )
        deadline = time.time() + 600
        while not all("waiting: another process" in p.read_text() for p in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [
                p.read_text()[-2000:] for p in logs
            ]
            time.sleep(1)
    finally:
        os.close(lock)  # release: the two runs now race for the lock
    for p in procs:
        assert p.wait(timeout=900) == 0, [p.read_text()[-3000:] for p in logs]
    outputs = [p.read_text() for p in logs]
    assert sum("building activation cache" in o for o in outputs) == 1, outputs
    assert sum("cache built" in o for o in outputs) == 1 and sum("cache hit" in o for o in outputs) == 1
    for i in range(2):
        result = json.loads((tmp_path / f"run{i}" / "eval.json").read_text())
        assert result["activation_source"] == f"cache:{built[0].name}"
    got = json.loads((key_dir / "manifest.json").read_text())["shards"]
    want = json.loads((built[0] / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in got] == [s["sha256"] for s in want]
