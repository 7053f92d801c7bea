"""Grouped sweeps (hydra/launcher=grouped): several SAEs on one LM pass, each with its own
run dir, the same as separate runs would write, and a failing member keeps its failure."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import yaml
from conftest import CONF_DIR, TINY_RUN, metrics_without_timing, run_cli, weights

# Member 0 diverges (lr 1e30 blows the weights up after its first step: 2 skipped steps
# end it), member 1 trains normally; checkpoints every 2 steps.
GRID = "optimizer.lr=1e30,4e-3"


@pytest.fixture(scope="module")
def shared(tiny_lm) -> list[str]:
    """What the members share, on the tiny model (grouping is bookkeeping, not the model's)."""
    return [
        *tiny_lm,
        *(o for o in TINY_RUN if not o.startswith("optimizer.lr=")),
        "sae.k=16",
        "training.grad_clip_norm=null",
        "training.max_nonfinite_steps=2",
        "training.checkpoint_every_tokens=2048",
    ]


def grouped_sweep(shared, sweep_dir, env=None):
    return run_cli(
        "saesweep.train",
        "--multirun",
        "hydra/launcher=grouped",
        *shared,
        GRID,
        f"hydra.sweep.dir={sweep_dir}",
        cwd=sweep_dir.parent,
        env=env,
    )


@pytest.fixture(scope="module")
def grouped(shared, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("grouped") / "sweep"
    proc = grouped_sweep(shared, sweep_dir)
    return sweep_dir, proc


@pytest.fixture(scope="module")
def separate(shared, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("separate")
    proc = run_cli("saesweep.train", *shared, "optimizer.lr=4e-3", f"hydra.run.dir={run_dir}", cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_grouped_member_matches_a_separate_run_and_a_failed_member_fails_alone(grouped, separate):
    sweep_dir, proc = grouped
    # The sweep reports the failed member as a failed job would be (one error line, exit 2)...
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "training diverged" in errors[0], proc.stderr[-3000:]
    assert "one LM pass" in proc.stdout + proc.stderr
    failed, done = sweep_dir / "0", sweep_dir / "1"
    assert json.loads((failed / "status.json").read_text())["status"] == "failed"
    assert not (failed / "eval.json").exists() and (failed / "checkpoint.pt").exists()
    # ...while the other member finished, with what a separate run writes,
    assert not (done / "checkpoint.pt").exists()
    for name in (
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
        "metrics.jsonl",
        "eval.json",
        "sae/cfg.json",
        "sae/sae_weights.safetensors",
    ):
        assert (done / name).exists(), name
    assert "optimizer.lr=0.004" in yaml.safe_load((done / ".hydra" / "overrides.yaml").read_text())
    assert yaml.safe_load((done / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"] == 0.004
    # and the same weights: its SAE was seeded as a separate run seeds it, and saw the same batches.
    want, got = weights(separate), weights(done)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name
    assert metrics_without_timing(done) == metrics_without_timing(separate)
    eval_group, eval_alone = (json.loads((d / "eval.json").read_text()) for d in (done, separate))
    assert eval_group["explained_variance"] == pytest.approx(eval_alone["explained_variance"], abs=1e-6)
    # Each member's log has its own messages, not the other's.
    assert "step skipped" in (failed / "train.log").read_text()
    assert "step skipped" not in (done / "train.log").read_text()
    report = (sweep_dir / "report.md").read_text()
    assert "2 members: 1 done, 1 failed" in report, report


@pytest.mark.slow
def test_a_killed_group_resumes_every_member(shared, grouped, tmp_path):
    """Killed after step 5: member 1 resumes from its step-4 checkpoint, member 0 (diverged at
    batch 3) from its own last good state, in a subgroup of its own; member 1 ends as if never
    stopped."""
    sweep_dir = tmp_path / "sweep"
    crashed = grouped_sweep(shared, sweep_dir, env={"SAESWEEP_CRASH_AT_STEP": "5"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert all((sweep_dir / m / "checkpoint.pt").exists() for m in "01")
    positions = [torch.load(sweep_dir / m / "checkpoint.pt", weights_only=True)["batches"] for m in "01"]
    assert positions == [3, 4]

    resumed = grouped_sweep(shared, sweep_dir)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 2 and "training diverged" in log, resumed.stderr[-3000:]
    assert "[0] resuming" in log and "[1] resuming" in log
    uninterrupted = grouped[0] / "1"
    want, got = weights(uninterrupted), weights(sweep_dir / "1")
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name
    assert metrics_without_timing(sweep_dir / "1") == metrics_without_timing(uninterrupted)
    assert not list(sweep_dir.rglob(".checkpoint.pt.*.tmp"))
    assert "2 members: 1 done, 1 failed" in (sweep_dir / "report.md").read_text()


def test_a_finished_member_is_not_trained_again(tmp_path):
    """eval.json marks a member finished: train_group returns it without loading anything."""
    from saesweep.config.schema import TrainConfig
    from saesweep.training.loop import train_group

    (tmp_path / "eval.json").write_text('{"l0": 3.0}')
    assert train_group([TrainConfig()], [tmp_path]) == [{"l0": 3.0}]


def test_group_members_may_differ_only_in_sae_optimizer_scheduler_objectives_and_hooks(monkeypatch):
    """What cannot share one LM pass (another model, dataset, context size, seed) is refused,
    naming the key; hook points may differ (one pass to the deepest)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from hydra_plugins.saesweep_grouped_launcher.grouped_launcher import GroupedLauncherConf, check_group
    from saesweep.errors import UserError

    may_differ = GroupedLauncherConf().may_differ
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def configs(*overrides):
            return [compose("train", [o], return_hydra_config=True) for o in overrides]

        saved = HydraConfig.instance().cfg
        try:
            check_group(configs("sae.k=8", "sae.k=16"), may_differ, UserError)
            check_group(configs("optimizer.lr=1e-3", "objectives=[l0]"), may_differ, UserError)
            with pytest.raises(UserError, match=r"config key 'training.seed': differs .*\(42 vs 7\).*grouped"):
                check_group(configs("training.seed=42", "training.seed=7"), may_differ, UserError)
            check_group(configs("sae.k=8", "model.hook_point=blocks.2.hook_resid_post"), may_differ, UserError)
            check_group(
                configs("model.hook_point_out=blocks.3.hook_resid_post", "model.hook_point=blocks.2.hook_resid_post"),
                may_differ,
                UserError,
            )
            for key, a, b in [
                ("model.name", "SmolLM2-135M-Instruct.Q4_1", "other-model"),
                ("model.dtype", "float32", "bfloat16"),
                ("dataset.context_size", 128, 64),
                ("dataset.path", "shakespeare", "other-corpus"),
                ("activations.exclude_bos", True, False),
            ]:
                with pytest.raises(UserError, match=rf"config key '{key}': differs .*\({a!r} vs {b!r}\)"):
                    check_group(configs(f"{key}={a}", f"{key}={b}"), may_differ, UserError)
        finally:
            HydraConfig.instance().cfg = saved


def test_group_checkpoints_are_renamed_only_when_all_are_written(tmp_path):
    """A failure while writing member 2's checkpoint leaves member 1's previous one in place."""
    from saesweep.training.checkpoint import load_checkpoint, save_checkpoints

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoints({a: {"step": 1}, b: {"step": 1}})

    def fail_on_b(state, tmp):
        if tmp.name.startswith(".b.pt"):
            raise OSError("disk full")
        torch.save(state, tmp)

    with pytest.raises(OSError):
        save_checkpoints({a: {"step": 2}, b: {"step": 2}}, write=fail_on_b)
    assert load_checkpoint(a)["step"] == 1 and load_checkpoint(b)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_the_launcher_is_found_as_a_hydra_plugin():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)]
    assert "hydra_plugins.saesweep_grouped_launcher.grouped_launcher.GroupedLauncher" in names
