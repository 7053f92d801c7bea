"""A group's members of one SAE class (or TopK and BatchTopK together) and shape train as one
stacked model (issue 17, item 2): each member equals its separate run (bit for bit with the
CPU's kernels), a member that diverges fails alone, members that cannot stack step alone, and
a stack of 8 dispatches at most twice the ops of one member."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from saesweep.config.schema import TrainConfig
from saesweep.errors import UserError
from saesweep.sae import ARCHITECTURES, sparse
from saesweep.training.checkpoint import CHECKPOINT_NAME
from saesweep.training.member import Member, read_back
from saesweep.training.stacked import MemberStack, Steppers, form_stacks
from saesweep.training.sync_counter import SyncCounter

D_IN, D_SAE, BATCH = 16, 64, 64


def make_member(run_dir: Path, arch: str = "batchtopk", log_every: int = 3, **settings: Any) -> Member:
    """A started member; settings: `sae.*`, `optimizer.*`, `training.*` or `model.*` keys."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig()
    sae = {"k": 4, "aux_k": 8, "dead_steps_threshold": 2} if "topk" in arch else {}
    if arch == "matryoshka_batchtopk":
        sae["matryoshka_widths"] = [8, 32]
    sae.update({k[4:]: v for k, v in settings.items() if k.startswith("sae.")})
    cfg.sae = ARCHITECTURES[arch].config_class(architecture=arch, d_sae=sae.pop("d_sae", D_SAE), **sae)
    cfg.training.batch_size = BATCH
    cfg.training.total_tokens = BATCH * 100
    cfg.training.log_every = log_every
    for key, value in settings.items():
        group, _, name = key.partition(".")
        if group in ("optimizer", "training", "model"):
            setattr(getattr(cfg, group), name, value)
    member = Member(0, cfg, run_dir, named=False)
    first = torch.randn(8 * BATCH, D_IN, generator=torch.Generator().manual_seed(5))
    member.start(SimpleNamespace(d_in=D_IN, d_out=D_IN), torch.device("cpu"), 100, (first, first))
    return member


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, D_IN, generator=g) for _ in range(n)]


def train(members: list[Member], data: list[torch.Tensor], stacked: bool) -> None:
    """Steps as train_together takes them: stacked (Steppers), or each member alone."""
    steppers = Steppers()
    for x in data:
        live = [m for m in members if m.error is None]
        for stepper in steppers.covering(live) if stacked else live:
            stepper.train_step(x, x)
        read_back(live, lambda: 1.0)


def state(member: Member) -> dict[str, torch.Tensor]:
    out = {f"sae.{k}": v for k, v in member.sae.state_dict().items()}
    for i, s in enumerate(member.optimizer.state.values()):
        out.update({f"opt{i}.{k}": v for k, v in s.items()})
    out["tokens_since_fired"] = member.tokens_since_fired
    return out


# Per-member settings a sweep varies inside one stack.
SWEEP = [
    {"sae.k": 4, "optimizer.lr": 4e-3, "sae.aux_k_coefficient": 1.0},
    {"sae.k": 4, "optimizer.lr": 1e-3, "sae.aux_k_coefficient": 0.5, "sae.dead_steps_threshold": 3},
    {
        "sae.k": 4,
        "optimizer.lr": 2e-3,
        "optimizer.name": "adamw",
        "optimizer.weight_decay": 0.1,
        "sae.threshold_lr": 0.1,
    },
]


# The grid: TopK and BatchTopK members in one group, interleaved (the stack sorts them).
# Its member 0, a group of 1, is the default run's BatchTopK, the "one SAE"; SWEEP's
# BatchTopK-only setting (threshold_lr) falls on a BatchTopK member.
MIXED = "topk+batchtopk"


def member_arch(arch: str, i: int) -> str:
    return ("batchtopk", "topk")[i % 2] if arch == MIXED else arch


# A schedule of k (OpenMOSS's): member 1 starts at 10 and decays to its k from step 1 to 5.
K_SCHEDULE = {"sae.initial_k": 10, "sae.k_cold_booting_steps": 1, "sae.k_warmup_steps": 4}


def sweep(arch: str, settings: list[dict]) -> list[dict]:
    if arch in ("batchtopk", MIXED, "matryoshka_batchtopk"):  # TopK alone in MIXED: its k its own
        return [{**s, **K_SCHEDULE} if i == 1 else s for i, s in enumerate(settings)]
    if arch in ("standard", "gated"):  # their own knobs instead: the L1 coefficient and its warm-up
        return [
            {
                "sae.l1_coefficient": 5.0 / (i + 1),
                "sae.l1_warm_up_steps": 3 * i,
                **{k: v for k, v in s.items() if not k.startswith("sae.")},
            }
            for i, s in enumerate(settings)
        ]
    if arch == "jumprelu":  # the L0 and pre-activation coefficients, the revival window
        return [
            {
                "sae.l0_coefficient": 2.0 / (i + 1),
                "sae.l0_warm_up_steps": 4 * i,
                "sae.pre_act_loss_coefficient": 3e-3 * (i + 1),
                "sae.pre_act_dead_after_tokens": BATCH * (2 + i),  # dead latents within the run
                **{k: v for k, v in s.items() if not k.startswith("sae.")},
            }
            for i, s in enumerate(settings)
        ]
    return [{k: v for k, v in s.items() if k != "sae.threshold_lr"} for s in settings]


@pytest.mark.parametrize("autocast", ["none", "bf16"])
@pytest.mark.parametrize("arch", ["batchtopk", "topk", MIXED, "matryoshka_batchtopk", "standard", "jumprelu", "gated"])
@pytest.mark.parametrize("choices", ["cpu", "cuda"])
def test_stacked_members_equal_their_separate_runs(tmp_path, monkeypatch, arch, choices, autocast):
    """With the CPU's kernels bit for bit, with and without dead latents (AuxK, JumpReLU's
    pre-activation loss); with a GPU's forced, to float rounding (the batched AuxK, as a GPU
    run's fixed-size one, rounds its sums in another order). Metrics logged and skipped steps
    included."""
    if choices == "cuda":
        monkeypatch.setattr(sparse, "KERNELS", sparse.KERNELS.as_on("cuda"))
    settings = sweep(arch, SWEEP)
    for dead in (False, True):
        extra = {
            "training.autocast": autocast,
            **({"sae.dead_steps_threshold": 1000} if "topk" in arch and not dead else {}),
            # JumpReLU: thresholds most latents stay under for a few batches, or a window never reached.
            **({"sae.init_threshold": 0.3} if arch == "jumprelu" and dead else {}),
            **({"sae.pre_act_dead_after_tokens": 10**9} if arch == "jumprelu" and not dead else {}),
        }
        alone, group = (
            [
                make_member(tmp_path / f"{dead}-{kind}{i}", member_arch(arch, i), **{**s, **extra})
                for i, s in enumerate(settings)
            ]
            for kind in ("alone", "group")
        )
        assert [type(s) for s in form_stacks(group)] == [MemberStack]
        data = batches(7)
        data[4] = data[4].clone()
        data[4][0, 0] = float("nan")  # a skipped step, in every member
        train(alone, data, stacked=False)
        train(group, data, stacked=True)
        for a, g in zip(alone, group):
            assert a.error is None and g.error is None and a.step == g.step == 6
            want, got = state(a), state(g)
            assert want.keys() == got.keys()
            for name in want:
                if choices == "cpu":
                    assert torch.equal(want[name].nan_to_num(), got[name].nan_to_num()), name
                else:
                    torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, equal_nan=True, msg=name)
            if choices == "cpu":
                assert (a.run_dir / "metrics.jsonl").read_text() == (g.run_dir / "metrics.jsonl").read_text()


def test_per_member_k_in_one_stack(tmp_path):
    """Members of different k share a stack. BatchTopK's selection lists each member's own
    entries in its own order: bit for bit. TopK takes one sorted top-k at the largest k, masked
    per member: its entries in another order than a separate run's unsorted top-k, so its sums
    round differently (to float rounding)."""
    settings = [{"sae.k": 2, "sae.aux_k": 0}, {"sae.k": 7, "sae.aux_k": 0}, {"sae.k": 4, "sae.aux_k": 0}]
    for arch in ("topk", "batchtopk"):
        alone = [make_member(tmp_path / f"{arch}-alone{i}", arch, **s) for i, s in enumerate(settings)]
        group = [make_member(tmp_path / f"{arch}-group{i}", arch, **s) for i, s in enumerate(settings)]
        data = batches(5)
        train(alone, data, stacked=False)
        train(group, data, stacked=True)
        for a, g in zip(alone, group):
            for name, want in state(a).items():
                got = state(g)[name]
                if arch == "batchtopk":
                    assert torch.equal(got.nan_to_num(), want.nan_to_num()), name
                else:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=(arch, name))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_stacked_forward_and_backward_against_each_members_own(tmp_path, arch):
    """One stacked pass against copies of the members' SAEs on the same batch: loss terms, L0
    and firing per member, the reconstruction, and every parameter's gradient, bit for bit
    (the CPU's kernels); with latents dead (AuxK)."""
    group = [make_member(tmp_path / f"m{i}", arch, **{"optimizer.lr": 1e-3 * (i + 1), "sae.k": 1}) for i in range(3)]
    x = batches(5)
    train(group, x[:4], stacked=False)  # a few steps: latents die, the members drift apart
    own = [copy.deepcopy(m.sae) for m in group]
    stack = MemberStack(group)
    out = stack.sae(x[4], x[4])
    sum(out.losses.values()).sum().backward()
    for i, sae in enumerate(own):
        mine = sae(x[4], x[4], 0)
        sum(mine.losses.values()).backward()
        assert out.losses.keys() == mine.losses.keys() == {"mse", "auxk"} and float(mine.losses["auxk"].detach()) > 0
        for name in out.losses:
            assert torch.equal(out.losses[name][i], mine.losses[name]), name
        assert torch.equal(out.l0[i], mine.l0) and torch.equal(out.fired[i], mine.fired)
        assert torch.equal(out.recon[i], mine.recon)
        for name, p in sae.named_parameters():
            assert torch.equal(getattr(stack.sae, name).grad[i], p.grad), name
        assert torch.equal(stack.sae.steps_since_fired[i], sae.steps_since_fired)


def test_a_diverging_member_fails_alone_and_leaves_the_stack(tmp_path):
    """lr 1e30 blows member 0 up after its first step; two skipped steps end it. Member 1 trains
    on, first in the stack, then alone, and equals its separate run; member 0's state is its
    last good one."""
    settings = [{"optimizer.lr": 1e30}, {"optimizer.lr": 4e-3}]
    common = {"training.grad_clip_norm": None, "training.max_nonfinite_steps": 2, "sae.aux_k": 0}
    group = [make_member(tmp_path / f"g{i}", log_every=2, **s, **common) for i, s in enumerate(settings)]
    alone = make_member(tmp_path / "alone", log_every=2, **settings[1], **common)
    steppers = Steppers()
    data = batches(8)
    after_first = None
    for x in data:
        live = [m for m in group if m.error is None]
        for stepper in steppers.covering(live):
            stepper.train_step(x, x)
        read_back(live, lambda: 1.0)
        if after_first is None:
            after_first = {k: v.clone() for k, v in state(group[0]).items()}
        alone.train_step(x, x)
        read_back([alone], lambda: 1.0)
    assert isinstance(group[0].error, UserError) and "training diverged" in str(group[0].error)
    assert group[1].error is None and group[1].step == alone.step == 8
    assert steppers.covering([group[1]]) == [group[1]]  # the stack is gone: member 1 steps alone
    for name, want in state(alone).items():
        assert torch.equal(state(group[1])[name].nan_to_num(), want.nan_to_num()), name
    assert (tmp_path / "g1" / "metrics.jsonl").read_text() == (tmp_path / "alone" / "metrics.jsonl").read_text()
    frozen = state(group[0])
    assert group[0].step == 1
    for name in after_first:
        if name != "sae.steps_since_fired":  # counts every batch it saw
            assert torch.equal(frozen[name].nan_to_num(), after_first[name].nan_to_num()), name


def test_a_stacked_members_checkpoint_is_its_own(tmp_path):
    """A checkpoint holds the member's tensors, not the stack they are views of, and resumes
    a member that steps alone to the same weights."""
    group = [make_member(tmp_path / f"m{i}", **{"optimizer.lr": lr}) for i, lr in enumerate((1e-3, 2e-3))]
    data = batches(6)
    train(group, data[:3], stacked=True)
    read_back(group, lambda: 1.0, everything=True)
    path = tmp_path / "r" / CHECKPOINT_NAME
    path.parent.mkdir()
    torch.save(group[1].state({"batches": 3}), path)
    unstacked = make_member(tmp_path / "u", **{"optimizer.lr": 2e-3})
    train([unstacked], data[:3], stacked=False)
    torch.save(unstacked.state({"batches": 3}), tmp_path / "u.pt")
    assert path.stat().st_size < 1.05 * (tmp_path / "u.pt").stat().st_size  # not the stack's tensors
    resumed = make_member(tmp_path / "r", **{"optimizer.lr": 2e-3})
    assert resumed.step == 3
    train(group, data[3:], stacked=True)
    train([resumed], data[3:], stacked=False)
    for name, want in state(group[1]).items():
        assert torch.equal(state(resumed)[name].nan_to_num(), want.nan_to_num()), name


def test_members_that_cannot_stack_step_alone(tmp_path):
    kinds = [
        make_member(tmp_path / "a", "batchtopk"),
        make_member(tmp_path / "b", "batchtopk", **{"sae.d_sae": 32}),  # another width
        make_member(tmp_path / "c", "topk"),  # another class, but TopK stacks with BatchTopK
        make_member(tmp_path / "d", "batchtopk", **{"sae.initial_k": 8}),  # a k schedule: stacks with a
        make_member(tmp_path / "e", "batchtopk", **{"training.compile": True}),
        make_member(tmp_path / "f", "standard"),  # the only one of its class
        make_member(tmp_path / "j", "jumprelu"),
        make_member(tmp_path / "k", "jumprelu", **{"sae.bandwidth": 1.0}),  # another kernel width
        make_member(tmp_path / "l", "gated", **{"sae.l1_warm_up_steps": 4}),  # an L1 warm-up: stacks with m
        make_member(tmp_path / "m", "gated", **{"sae.l1_coefficient": 1.0}),
        make_member(tmp_path / "h", "batchtopk", **{"model.hook_point": "blocks.3.hook_resid_post"}),  # other data
        make_member(tmp_path / "n", "matryoshka_batchtopk"),  # its own loss terms: never with BatchTopK
        make_member(tmp_path / "o", "matryoshka_batchtopk", **{"sae.matryoshka_widths": [16]}),  # other levels
        make_member(tmp_path / "g", "batchtopk", **{"sae.k": 8}),  # stacks with a
    ]
    steppers = form_stacks(kinds)
    stacks = [s for s in steppers if isinstance(s, MemberStack)]
    by_name = {m.run_dir.name: m for m in kinds}
    names = [[m.run_dir.name for m in s.members] for s in stacks]
    assert names == [["a", "d", "g", "c"], ["l", "m"]]  # a class's members side by side
    stacked = {"a", "d", "g", "c", "l", "m"}
    assert {id(s) for s in steppers if isinstance(s, Member)} == {id(m) for n, m in by_name.items() if n not in stacked}
    assert form_stacks([kinds[0]]) == [kinds[0]]  # a stack of one is the member itself


@pytest.mark.parametrize("arch", ["batchtopk", "topk", MIXED, "matryoshka_batchtopk", "jumprelu", "gated"])
@pytest.mark.parametrize("choices", ["cpu", "cuda"])
def test_a_stack_of_8_dispatches_at_most_twice_the_ops_of_one_member(tmp_path, monkeypatch, arch, choices):
    """Counted as bench_syncs counts them (no LM: a cache-fed step), steady non-logging steps,
    with latents dead (AuxK on; JumpReLU's pre-activation loss on); it was 8x before stacks.
    With a GPU's choices forced, no op would sync either."""
    if choices == "cuda":
        monkeypatch.setattr(sparse, "KERNELS", sparse.KERNELS.as_on("cuda"))
    ops = {}
    for n in (1, 8):
        settings = sweep(arch, [{"sae.k": 4 + i % 3, "optimizer.lr": 1e-3 * (i + 1)} for i in range(n)])
        members = [
            make_member(tmp_path / f"{n}-{i}", member_arch(arch, i), log_every=100, **s) for i, s in enumerate(settings)
        ]
        steppers = Steppers()
        for i, x in enumerate(batches(4)):
            with SyncCounter() as counter:
                for stepper in steppers.covering(members):
                    stepper.train_step(x, x)
                read_back(members, lambda: 1.0)
            assert all(m.error is None for m in members)
        ops[n] = counter.ops
        if choices == "cuda":
            assert not counter.syncs, dict(counter.syncs)
    assert ops[8] <= 2 * ops[1], ops


@pytest.mark.parametrize("selection", ["compact", "fixed"])
@pytest.mark.parametrize("seed", range(4))
def test_a_stacks_batch_topk_selects_each_members_own_entries(monkeypatch, selection, seed):
    """Large enough for the compact path's sampled cutoff (k 300: too dense to sample, every
    entry a candidate); ties at the cutoff (the first in row order win); members of different
    k; a NaN in a sampled member's top ranks makes its floor NaN: each member's own path."""
    monkeypatch.setattr(sparse, "KERNELS", sparse.Kernels(selection=selection))
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(3, 256, 512, generator=g)
    if seed % 2:
        pre = pre.mul(2).round()
    if seed == 3:
        pre[1, 0, 0] = float("nan")  # the first entry: in the strided sample
    ks = [1, 7, 300] if seed < 2 else [7, 7, 7]
    own = sparse.batch_topk_indices
    alone: list[int] = []
    monkeypatch.setattr(sparse, "batch_topk_indices", lambda p, k: alone.append(k) or own(p, k))
    rows, cols = sparse.stacked_batch_topk_indices(pre, ks, torch.tensor(ks))
    monkeypatch.setattr(sparse, "batch_topk_indices", own)
    assert alone == (ks if selection == "compact" and seed == 3 else [])  # the batched path, but for the NaN
    want_rows, want_cols = [], []
    for m, (p, k) in enumerate(zip(pre, ks)):
        r, c = sparse.batch_topk_indices(p, k)
        want_rows.append(r + m * 256)
        want_cols.append(c)
    assert torch.equal(rows, torch.cat(want_rows)) and torch.equal(cols, torch.cat(want_cols))
