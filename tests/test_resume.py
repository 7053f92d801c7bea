"""Checkpoints: a run killed mid-way and rerun ends with the same weights as one never stopped."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import TINY_RUN, metrics_without_timing, run_cli, weights

from saesweep.training.checkpoint import StopSignals
from saesweep.training.run_record import config_differences


@pytest.fixture(scope="module")
def run(tiny_lm) -> list[str]:
    """The runs here train on the tiny model: resuming is bookkeeping, not the model's."""
    return [*tiny_lm, *TINY_RUN, "training.checkpoint_every_tokens=2048", "sae.k=16"]


@pytest.fixture(scope="module")
def uninterrupted(run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    proc = run_cli("saesweep.train", *run, f"hydra.run.dir={run_dir}", cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


# Early (before the first checkpoint), mid-run (after one), and half-way through writing one.
@pytest.mark.slow
@pytest.mark.parametrize("crash_step", ["1", "5", "6:checkpoint"])
def test_killed_and_resumed_run_matches_uninterrupted(run, uninterrupted, tmp_path, crash_step):
    args = [*run, f"hydra.run.dir={tmp_path}"]
    crashed = run_cli("saesweep.train", *args, cwd=tmp_path, env={"SAESWEEP_CRASH_AT_STEP": str(crash_step)})
    assert crashed.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoint.pt").exists() == (crash_step != "1") and not (tmp_path / "eval.json").exists()
    if crash_step == "6:checkpoint":
        assert list(tmp_path.glob(".checkpoint.pt.*.tmp")), "the write was not interrupted"

    resumed = run_cli("saesweep.train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("resuming" in resumed.stdout + resumed.stderr) == (crash_step != "1")
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    want, got = weights(uninterrupted), weights(tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name
    assert metrics_without_timing(tmp_path) == metrics_without_timing(uninterrupted)


@pytest.mark.slow
def test_finished_run_is_not_trained_again(run, uninterrupted):
    before = (uninterrupted / "eval.json").read_text()
    again = run_cli("saesweep.train", *run, f"hydra.run.dir={uninterrupted}", cwd=uninterrupted)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    assert (uninterrupted / "eval.json").read_text() == before


@pytest.mark.slow
def test_resuming_with_a_different_config_is_refused(run, tmp_path):
    args = [*run, f"hydra.run.dir={tmp_path}"]
    run_cli("saesweep.train", *args, cwd=tmp_path, env={"SAESWEEP_CRASH_AT_STEP": "3"})
    checkpoint_before = (tmp_path / "checkpoint.pt").read_bytes()
    proc = run_cli("saesweep.train", *args, "sae.k=8", cwd=tmp_path)
    assert proc.returncode == 2
    assert "sae.k (16 -> 8)" in proc.stderr and "training.resume=force" in proc.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == checkpoint_before


def test_config_differences_names_nested_keys():
    saved = {"sae": {"k": 16, "architecture": "topk"}, "optimizer": {"lr": 1e-3}}
    now = {"sae": {"k": 8, "architecture": "topk"}, "optimizer": {"lr": 1e-3}, "extra": 1}
    assert config_differences(saved, now) == ["extra (None -> 1)", "sae.k (16 -> 8)"]


def test_stop_signals_turn_a_signal_into_a_flag_then_hand_it_on():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.received == signal.SIGUSR2 and seen == []
            stop.resend()  # what submitit installed gets it now
            assert seen == [signal.SIGUSR2] and stop.received is None
        assert signal.getsignal(signal.SIGUSR2) is not None
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_an_ignored_signal_stays_ignored():
    """A shell's background job starts with SIGINT ignored: a stray SIGINT must not announce
    a stop that resend then undoes, and training goes on as the shell asked."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received is None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
