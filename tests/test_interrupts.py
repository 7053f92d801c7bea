"""Interrupts and divergence: Ctrl-C keeps the work, NaN steps are skipped, then stop the run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import TINY_RUN, run_cli, wait_until_training


@pytest.mark.slow
def test_ctrl_c_saves_checkpoint_and_partial_sae_then_resumes(tmp_path):
    # 16 steps on the embedded model: SIGINT lands mid-run, after the first metrics line.
    run = [o for o in TINY_RUN if not o.startswith("training.total_tokens=")] + ["training.total_tokens=16384"]
    args = [sys.executable, "-m", "saesweep.train", *run, "sae.k=8", f"hydra.run.dir={tmp_path}"]
    # A shell without job control starts background jobs with SIGINT ignored, and the child
    # would inherit that (a CI run under `&`); a person's terminal delivers it.
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until_training(proc, tmp_path / "metrics.jsonl")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert f"hydra.run.dir={tmp_path}" in err and "to resume" in err, err[-2000:]
    assert "Traceback" not in err
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "eval.json").exists()
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["partial"] is True and 0 < meta["tokens_trained"] < 16384

    resumed = run_cli("saesweep.train", *run, "sae.k=8", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    assert "partial" not in json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert json.loads((tmp_path / "eval.json").read_text())["tokens_trained"] == 16384


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny_lm, tmp_path):
    """lr 1e30 blows the weights up after one step: every later loss is inf."""
    proc = run_cli(
        "saesweep.train",
        *tiny_lm,
        *TINY_RUN,
        "optimizer.lr=1e30",
        "training.grad_clip_norm=null",
        "training.max_nonfinite_steps=3",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged: 3 steps in a row" in errors[0], proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("step skipped") == 3
    # the last good state was kept: the skipped steps left no NaN in weights or running stats
    # (calibrated_threshold is NaN until the end-of-training calibration, by design)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    tensors = {k: t for k, t in state["sae"].items() if t.is_floating_point() and k != "calibrated_threshold"}
    assert {"W_enc", "threshold_ema"} <= tensors.keys()
    assert all(torch.isfinite(t).all() for t in tensors.values()), {k: t.abs().max() for k, t in tensors.items()}
    assert state["step"] == 1  # the one step before the blow-up
    assert not (tmp_path / "eval.json").exists()


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Disk full half-way through torch.save: the old checkpoint stays, no temp file is left."""
    import errno

    from saesweep.training import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoints({path: {"step": 1, "w": torch.ones(3)}})

    def disk_full(state, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoints({path: {"step": 2, "w": torch.zeros(3)}})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_skipped_step_is_made_up_and_the_run_finishes(tiny_lm, tmp_path, monkeypatch):
    """One non-finite step is skipped, not counted: the run draws one batch more than planned
    (the buffer pulls it past its limit) and still trains total_tokens // batch_size steps."""
    from hydra import compose, initialize_config_dir

    from saesweep.config import CONF_DIR
    from saesweep.config.schema import validate
    from saesweep.training import loop, member

    calls = 0
    start = member.Member.start

    def start_poisoned(self, *args, **kwargs):
        start(self, *args, **kwargs)
        forward = self.forward

        def poisoned(x, target, step):
            nonlocal calls
            out = forward(x, target, step)
            calls += 1
            if calls == 3:
                out.losses["mse"] = out.losses["mse"] * float("inf")
            return out

        self.forward = poisoned

    monkeypatch.setattr(member.Member, "start", start_poisoned)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = validate(compose("train", [*tiny_lm, *TINY_RUN, "sae.k=8"]))
    result = loop.train(cfg, tmp_path)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert calls == 9 and steps[-1] == 8 and result["tokens_trained"] == 8192
