"""Data-parallel training (training.distributed=ddp): rank shares of the data, the collectives
of a step on two real gloo processes, and the CLI under torchrun against one process."""

from __future__ import annotations

import json
import signal
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_RUN, metrics_without_timing, run_cli, run_in_process, weights

from saesweep.config.schema import DatasetConfig, TrainingConfig
from saesweep.errors import UserError
from saesweep.training.distributed import Launch, Ranks, check_launch, launched

# --------------------------------------------------------------------------- data shares


def test_rank_shares_of_the_rows_are_disjoint_and_cover_every_row_once_per_epoch():
    from saesweep.data.rows import TokenRows

    table = torch.arange(10 * 4).reshape(10, 4)  # 10 distinct rows
    rows = TokenRows(table[:1], table, None, DatasetConfig(), None, seed=3)
    epoch = [int(r[0]) for _, r in zip(range(10), rows.train_iter())]
    for world in (2, 3):
        shares = [
            [int(r[0]) for _, r in zip(range(len(range(rank, 10, world))), rows.train_iter(0, rank, world))]
            for rank in range(world)
        ]
        assert sorted(sum(shares, [])) == sorted(epoch)  # disjoint, and together every row
        assert shares[0] == epoch[0::world]  # rank r: rows r, r + world, ... of one order
        # A resumed rank continues its own share: `start` counts its rows, across epochs too.
        straight = [int(r[0]) for _, r in zip(range(12), rows.train_iter(0, 1, world))]
        resumed = [int(r[0]) for _, r in zip(range(7), rows.train_iter(5, 1, world))]
        assert resumed == straight[5:]


def tiny_cache(tmp_path: Path, sizes: list[int]):
    """A real on-disk cache of len(sizes) shards whose tokens are numbered 0, 1, 2, ..."""
    from saesweep.activations.cache import ActivationCache, shard_name, write_shard

    shards, start = [], 0
    for i, n in enumerate(sizes):
        ids = torch.arange(start, start + n, dtype=torch.float32)[:, None]
        shards.append(write_shard(tmp_path / shard_name(i), {"h": ids}, (i, i + 1)))
        start += n
    return ActivationCache(tmp_path, {"key": "k", "hooks": ["h"], "tokens": start, "shards": shards})


def read_ids(reader, n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        out += [int(v) for v in next(reader)[0][:, 0]]
    return out[:n]


@pytest.mark.parametrize("world", [1, 2, 4])  # 4 ranks > 3 shards: shards split in parts
def test_cache_ranks_read_disjoint_shares_of_each_pass_and_resume_within_their_own(tmp_path, world):
    cache = tiny_cache(tmp_path, [50, 70, 60])
    for epoch in (0, 1):
        seen: list[int] = []
        for rank in range(world):
            reader = cache.reader(["h"], seed=7, rank=rank, world=world)
            before = sum(n for e in range(epoch) for _, _, n in reader.share(e))
            pass_ids = read_ids(reader, before + sum(n for _, _, n in reader.share(epoch)))[before:]
            seen += pass_ids
            if world <= 3:  # whole shards: a rank opens only its own files
                assert len({i for i, _, _ in reader.share(epoch)}) == len(reader.share(epoch))
        assert sorted(seen) == list(range(180))  # each pass: every token once over the ranks
    # Resume: a rank's position counts its own tokens, across passes.
    reader = cache.reader(["h"], seed=7, rank=world - 1, world=world)
    straight = read_ids(reader, 400)
    resumed = read_ids(cache.reader(["h"], seed=7, position=150, rank=world - 1, world=world), 250)
    assert resumed == straight[150:]


# --------------------------------------------------------------------------- launch checks


def test_launch_is_read_from_torchrun_or_from_srun_but_not_from_a_batch_script(monkeypatch):
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_LOCALID",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert launched() is None
    # sbatch --ntasks=2 running python directly: one process, though SLURM_NTASKS says 2
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert launched() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # srun's tasks (seen on the test cluster)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launched() == Launch(1, 2, 1, "slurm")
    monkeypatch.setenv("RANK", "3")  # torchrun inside an allocation is what started us
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launched() == Launch(3, 4, 3, "torchrun")


def test_later_ranks_keep_hydra_out_of_the_run_dir_and_a_sweep_under_torchrun_is_refused(monkeypatch):
    from saesweep.training.distributed import QUIET_RANK_OVERRIDES, rank_overrides

    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert rank_overrides(["training.distributed=ddp"]) == []
    monkeypatch.setenv("RANK", "1")
    assert rank_overrides(["training.distributed=ddp"]) == QUIET_RANK_OVERRIDES
    with pytest.raises(UserError, match="--multirun under torchrun"):
        rank_overrides(["--multirun", "sae.k=8,16"])


def test_bad_launch_configs_are_one_line_errors_naming_the_key():
    two = Launch(0, 2, 0, "torchrun")
    with pytest.raises(UserError, match=r"'training.batch_size': 1023 .* over 2 ranks; use a multiple of 2"):
        check_launch(TrainingConfig(distributed="ddp", batch_size=1023), two)
    with pytest.raises(UserError, match=r"'training.distributed': none, but torchrun started 2 processes"):
        check_launch(TrainingConfig(distributed="none"), two)
    with pytest.raises(UserError, match=r"'training.device': cuda:1 .* use auto or cuda"):
        check_launch(TrainingConfig(distributed="ddp", device="cuda:1"), two)
    with pytest.raises(UserError, match=r"'training.distributed': 'fsdp'; valid: none, ddp"):
        check_launch(TrainingConfig(distributed="fsdp"), None)
    check_launch(TrainingConfig(distributed="ddp", batch_size=1023), None)  # one process: any batch


# --------------------------------------------------------------------------- one step, two ranks

# Each check runs in both processes of one gloo group (spawned once for the module) and
# compares with one process on the whole batch; rank r's share is rows r::2.


def _replica_and_reference(arch: str, seed: int = 0):
    from saesweep.sae import ARCHITECTURES, build_sae

    cls = ARCHITECTURES[arch]
    # Few tokens, many latents: some stay silent for steps (dead for AuxK / the pre-act loss).
    extra = {"k": 2, "dead_steps_threshold": 2} if arch in ("topk", "batchtopk") else {}
    if arch == "jumprelu":
        extra = {"pre_act_loss_coefficient": 1.0, "pre_act_dead_after_tokens": 16}
    cfg = cls.config_class(architecture=arch, d_sae=64, **extra)
    saes = []
    for _ in range(2):  # the replica this rank trains, and the one-process reference
        torch.manual_seed(seed)
        saes.append(build_sae(cfg, 8))
    return saes


def _steps(sae, batches, ranks: Ranks | None, share: slice | None):
    from saesweep.training.distributed import SINGLE

    ranks = ranks or SINGLE
    opt = torch.optim.Adam(sae.parameters(), lr=3e-2)
    fired_counter = torch.zeros(sae.d_sae, dtype=torch.long)
    sae.train()
    for step, x in enumerate(batches):
        x = x[share] if share is not None else x
        with ranks.running_state(sae):
            out = sae(x, x, step)
            opt.zero_grad()
            sum(out.losses.values()).backward()
            ranks.average_gradients(sae)
            opt.step()
            sae.after_step()
        fired = ranks.any(out.fired)
        fired_counter = torch.where(fired, 0, fired_counter + len(x) * ranks.world)
    return fired_counter


def _check_steps_match_one_process(ranks: Ranks, arch: str) -> None:
    """TopK and JumpReLU act per token, so two shares give exactly the whole batch's step."""
    replica, reference = _replica_and_reference(arch)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 8, generator=g) * 3 for _ in range(6)]
    ranks.broadcast_module(replica)
    got = _steps(replica, batches, ranks, slice(ranks.rank, None, 2))
    want = _steps(reference, batches, None, None)
    assert torch.equal(got, want), "trainer's fired counters"
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(replica.state_dict()[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    counter = "steps_since_fired" if arch == "topk" else "tokens_since_fired"
    assert torch.equal(replica.state_dict()[counter], reference.state_dict()[counter])
    counts = replica.state_dict()[counter]  # some latents fired in the last step, some not for a while
    assert int(counts.min()) == 0 and int(counts.max()) >= 2, counts
    if arch == "jumprelu":  # tokens of the global batch (8), not of a rank's share (4)
        assert bool((counts % 8 == 0).all()), counts
    _check_replicas_identical(ranks, replica)


def _check_replicas_identical(ranks: Ranks, sae) -> None:
    states = ranks.gather({k: v.clone() for k, v in sae.state_dict().items()})
    if ranks.is_main:
        for name in states[0]:
            torch.testing.assert_close(
                states[0][name], states[1][name], rtol=0, atol=0, equal_nan=True, msg=f"replicas differ in {name}"
            )


def check_topk_step_matches_one_process(ranks: Ranks) -> None:
    _check_steps_match_one_process(ranks, "topk")


def check_jumprelu_step_matches_one_process(ranks: Ranks) -> None:
    _check_steps_match_one_process(ranks, "jumprelu")


def check_batchtopk_threshold_is_the_mean_of_the_ranks_and_identical(ranks: Ranks) -> None:
    """BatchTopK selects within each share, so the step is not the whole batch's; the
    running threshold must still be one value: the mean of the shares' smallest survivors."""
    replica, _ = _replica_and_reference("batchtopk")
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))[ranks.rank :: 2] * 3
    ranks.broadcast_module(replica)
    replica.train()
    with ranks.running_state(replica):
        out = replica(x, x, 0)
        sum(out.losses.values()).backward()
        ranks.average_gradients(replica)
        smallest = replica._smallest_survivor.double().clone()
        replica.after_step()
    mean = ranks.mean({"s": float(smallest)})["s"]
    assert float(replica.threshold_ema) == pytest.approx(0.01 * mean, rel=1e-12)
    assert int(replica.threshold_updates) == 1
    _check_replicas_identical(ranks, replica)


def check_a_non_finite_share_skips_the_step_everywhere(ranks: Ranks) -> None:
    local = torch.tensor(float("nan") if ranks.rank == 1 else 1.0)
    assert ranks.all_true(torch.isfinite(local)).tolist() is False
    assert ranks.all_true(torch.isfinite(torch.tensor(1.0))).tolist() is True


def check_fired_masks_stop_signals_and_metrics_combine(ranks: Ranks) -> None:
    mask = torch.tensor([ranks.rank == 0, ranks.rank == 1, False])
    assert ranks.any(mask).tolist() == [True, True, False]
    assert ranks.max_int(int(signal.SIGUSR2) if ranks.rank == 1 else 0) == signal.SIGUSR2
    assert ranks.mean({"l0": 10.0 + 2 * ranks.rank, "loss": float(ranks.rank)}) == {"l0": 11.0, "loss": 0.5}
    assert ranks.broadcast_object(f"run-{ranks.rank}") == "run-0"
    gathered = ranks.gather({"rank": ranks.rank})
    assert gathered == ([{"rank": 0}, {"rank": 1}] if ranks.is_main else None)


def check_an_unknown_buffer_takes_rank_0s_value(ranks: Ranks) -> None:
    module = torch.nn.Module()
    module.register_buffer("new_running_stat", torch.zeros(3))
    with ranks.running_state(module):
        module.new_running_stat.fill_(ranks.rank + 5)
    assert module.new_running_stat.tolist() == [5.0, 5.0, 5.0]


CHECKS = {name: fn for name, fn in list(globals().items()) if name.startswith("check_") and fn.__module__ == __name__}


def _spawned(rank: int, world: int, rendezvous: str, out_dir: str, exit_together: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    ranks = Ranks(rank, world, rank, active=True)
    results = {}
    try:
        for name, check in CHECKS.items():
            try:
                check(ranks)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            ranks.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    # A rank that exits while its peer is still tearing gloo down aborts the peer ("terminate
    # called without an active exception", 3 spawns in 25 here): the ranks leave together.
    exit_together.wait(timeout=120)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' result of every check, from one spawn of two real gloo processes."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    exit_together = mp.get_context("spawn").Barrier(2)
    mp.spawn(_spawned, args=(2, str(out / "rendezvous"), str(out), exit_together), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_on_two_gloo_ranks(two_ranks, check):
    for rank, results in enumerate(two_ranks):
        assert results[check] == "ok", f"rank {rank}:\n{results[check]}"


# --------------------------------------------------------------------------- CLI under torchrun


@pytest.fixture(scope="module")
def run(tiny_lm) -> list[str]:
    """The runs here train on the tiny model: ranks sharing a step is bookkeeping, not the model's."""
    return [*tiny_lm, *TINY_RUN, "training.checkpoint_every_tokens=2048", "sae.k=16"]


RANK_FILES = (
    ".hydra/config.yaml",
    ".hydra/hydra.yaml",
    ".hydra/overrides.yaml",
    "train.log",
    "metrics.jsonl",
    "eval.json",
    "sae/cfg.json",
    "sae/sae_weights.safetensors",
    "sae/sparsity.safetensors",
)


def torchrun(*args: str, cwd: Path, env: dict | None = None):
    # --standalone: a free port of its own, so concurrent runs do not meet
    return run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "saesweep.train",
        "training.distributed=ddp",
        *args,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="module")
def one_process(run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    # The thread count torchrun gives each rank, so timings and kernels compare.
    proc = run_cli("saesweep.train", *run, f"hydra.run.dir={run_dir}", cwd=run_dir, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def two_processes(run, tmp_path_factory):
    """Each rank's Hydra names its own run dir (runs/<RANK>): rank 0's must win."""
    root = tmp_path_factory.mktemp("two")
    proc = torchrun(*run, "hydra.run.dir=" + str(root / "runs" / "${oc.env:RANK}"), cwd=root)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return root, proc


@pytest.mark.slow
def test_two_ranks_train_as_one_process_would_into_one_run_dir(one_process, two_processes):
    root, proc = two_processes
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["0"]  # rank 1's Hydra dir is gone
    run_dir = root / "runs" / "0"
    for name in RANK_FILES:
        assert (run_dir / name).exists(), name
    written = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert written == sorted(str(p.relative_to(one_process)) for p in one_process.rglob("*") if p.is_file())
    assert "x 2 ranks of 512" in (run_dir / "train.log").read_text()
    assert (run_dir / "train.log").read_text().count("trained on 8192 tokens") == 1  # rank 0's log only
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]

    one, two = (json.loads((d / "eval.json").read_text()) for d in (one_process, run_dir))
    assert two["tokens_trained"] == one["tokens_trained"] == 8192
    assert two["explained_variance"] == pytest.approx(one["explained_variance"], abs=0.01)
    assert two["explained_variance"] > 0.2  # trained, not a degenerate match
    assert two["l0"] == pytest.approx(16, rel=0.15)


@pytest.mark.slow
def test_killed_ranks_resume_to_the_uninterrupted_run_and_other_world_sizes_are_refused(run, two_processes, tmp_path):
    root, _ = two_processes
    straight = root / "runs" / "0"
    run_dir = tmp_path / "run"
    crashed = torchrun(*run, f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"SAESWEEP_CRASH_AT_STEP": "5"})
    assert crashed.returncode != 0 and (run_dir / "checkpoint.pt").exists() and not (run_dir / "eval.json").exists()
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["world_size"] == 2 and len(checkpoint["rank_streams"]) == 1

    # One process cannot continue two ranks' streams: refused, the checkpoint untouched.
    before = (run_dir / "checkpoint.pt").read_bytes()
    alone = run_cli("saesweep.train", *run, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert alone.returncode == 2
    assert "error: config key 'training.distributed'" in alone.stderr and "2 process(es)" in alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1, alone.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == before

    resumed = torchrun(*run, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming" in (run_dir / "train.log").read_text()
    want, got = weights(straight), weights(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    assert metrics_without_timing(run_dir) == metrics_without_timing(straight)
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.mark.slow
def test_batch_not_divisible_by_the_ranks_is_refused_before_training(tmp_path):
    proc = torchrun(
        *TINY_RUN,
        "training.batch_size=1001",
        "training.total_tokens=4004",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(
        "config key 'training.batch_size': 1001 tokens per step do not split evenly over 2 ranks" in e for e in errors
    ), proc.stderr[-3000:]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_grouped_launcher_refuses_ddp(tmp_path):
    import saesweep.train

    argv = ["--multirun", "hydra/launcher=grouped", "training.distributed=ddp", "sae.k=8,16"]
    code, out = run_in_process(saesweep.train.cli, [*argv, f"hydra.sweep.dir={tmp_path / 's'}"])
    assert code == 2
    assert "error: config key 'training.distributed': hydra/launcher=grouped" in out, out[-3000:]
    assert not list((tmp_path / "s").glob("*/metrics.jsonl"))
