"""A training step never waits on the device: no host sync in a steady step, one batched
read-back on a logging step, for the whole group (issue 17, item 1).

There is no GPU here, so the test counts, under a TorchDispatchMode, the aten ops that would
make a GPU's host wait (saesweep.training.sync_counter), with the choices a GPU makes forced
on the CPU: the kernels and fixed-size selections of `KERNELS.as_on("cuda")`, and the fused
optimizer (which the CPU takes too). Two things a CPU run cannot see, so the code routes them elsewhere:
copies to the host (`.tolist()`, `.cpu()` of a CUDA tensor) go only through
`saesweep.training.readback.to_host`, which the test counts; and syncs inside a CUDA kernel
(below the dispatcher), which only `torch.cuda.set_sync_debug_mode` on a GPU catches
(benchmarks/bench_step.py's host_syncs_per_step).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import saesweep.training.member as member_module
from saesweep.config.schema import TrainConfig
from saesweep.errors import UserError
from saesweep.sae import ARCHITECTURES, sparse
from saesweep.sae.matryoshka import MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKSAEConfig
from saesweep.sae.topk import TopKSAE, TopKSAEConfig
from saesweep.training.member import Member, read_back
from saesweep.training.sync_counter import SyncCounter

D_IN, D_SAE, BATCH = 16, 64, 64
EXTRA = {  # small enough for D_SAE; TopK family: AuxK on, with latents dead after 2 steps
    "topk": {"k": 4, "aux_k": 8, "dead_steps_threshold": 2},
    "batchtopk": {"k": 4, "aux_k": 8, "dead_steps_threshold": 2},
    "matryoshka_batchtopk": {"k": 4, "aux_k": 8, "dead_steps_threshold": 2, "matryoshka_widths": [16, 32]},
}


def make_member(run_dir: Path, arch: str, total_steps: int, log_every: int, **training: Any) -> Member:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = TrainConfig()
    cfg.sae = ARCHITECTURES[arch].config_class(architecture=arch, d_sae=D_SAE, **EXTRA.get(arch, {}))
    cfg.training.batch_size = BATCH
    cfg.training.total_tokens = BATCH * total_steps
    cfg.training.log_every = log_every
    for key, value in training.items():
        setattr(cfg.training, key, value)
    member = Member(0, cfg, run_dir, named=False)
    first = torch.randn(8 * BATCH, D_IN)
    member.start(SimpleNamespace(d_in=D_IN, d_out=D_IN), torch.device("cpu"), total_steps, (first, first))
    return member


def step(member: Member, x: torch.Tensor) -> None:
    """A step as the loop takes it: the step, then the group's read-back (a no-op unless due)."""
    member.train_step(x, x)
    read_back([member], lambda: 1.0)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, D_IN, generator=g) for _ in range(n)]


@pytest.fixture
def gpu_choices(monkeypatch):
    monkeypatch.setattr(sparse, "KERNELS", sparse.KERNELS.as_on("cuda"))


@pytest.fixture
def reads(monkeypatch):
    """Counts the batched read-backs; what one does itself is not counted as a step's sync."""
    calls: list[int] = []
    counter: dict[str, SyncCounter] = {}

    def counted(values: torch.Tensor) -> list[float]:
        calls.append(values.numel())
        with counter["mode"].pause() if "mode" in counter else nullcontext():
            return real(values)

    real = member_module.to_host
    monkeypatch.setattr(member_module, "to_host", counted)
    return calls, counter


@pytest.mark.parametrize("autocast", ["none", "bf16"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_steady_steps_never_sync_and_logging_steps_read_back_once(tmp_path, arch, autocast, gpu_choices, reads):
    calls, counter = reads
    log_every, steps = 3, 9
    member = make_member(tmp_path, arch, total_steps=100, log_every=log_every, autocast=autocast)
    data = batches(steps + 2)
    for x in data[:2]:  # the first steps build lazy state (optimizer moments)
        step(member, x)
    for x in data[2:]:
        before = len(calls)
        with SyncCounter() as mode:
            counter["mode"] = mode
            step(member, x)
        assert member.error is None, member.error
        assert mode.ops > 0 and not mode.syncs, (member.step, dict(mode.syncs))
        logging = member.step % log_every == 0
        assert len(calls) - before == (1 if logging else 0), member.step
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == (steps + 2) // log_every  # every logging step was logged


def test_the_counter_sees_what_would_sync(tmp_path):
    """The CPU's own choices (compact selections: nonzero, bool masks) are counted, so a
    step that would sync a GPU cannot pass the test above."""
    member = make_member(tmp_path, "matryoshka_batchtopk", total_steps=100, log_every=100)
    x = torch.randn(4096, D_IN)  # past the sampled-cutoff threshold of batch_topk_indices
    step(member, x)
    with SyncCounter() as mode:
        step(member, x)
    assert mode.syncs["nonzero"] >= 2 and mode.syncs["index with a bool mask"] >= 1, mode.syncs
    repeats = torch.tensor([1, 2, 0])
    with SyncCounter() as mode:
        float(x.sum())
        torch.arange(3).repeat_interleave(repeats)
        torch.arange(3).repeat_interleave(repeats, output_size=3)
        torch.equal(x, x)
        torch.tensor([4, 5])  # on a GPU's device, a blocking copy from the host
    assert mode.syncs == {"_local_scalar_dense": 1, "repeat_interleave": 1, "equal": 1, "lift_fresh": 1}


# --- the fixed-size selections select what the compact ones do --------------------------


@pytest.mark.parametrize("seed", range(4))
def test_fixed_batch_topk_selects_the_compact_selections_entries(monkeypatch, seed):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(256, 512, generator=g)  # 131072 entries: the compact path samples a cutoff
    if seed % 2:
        pre = pre.mul(2).round()  # many ties at the cutoff: the first in row order win
    for k in (1, 7, 300):
        monkeypatch.setattr(sparse, "KERNELS", sparse.Kernels(selection="compact"))
        want = sparse.batch_topk_indices(pre, k)
        monkeypatch.setattr(sparse, "KERNELS", sparse.Kernels(selection="fixed"))
        got = sparse.batch_topk_indices(pre, k)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), k


def test_fixed_batch_topk_by_hand(monkeypatch):
    monkeypatch.setattr(sparse, "KERNELS", sparse.Kernels(selection="fixed"))
    pre = torch.tensor([[5.0, 1.0, 3.0], [3.0, 4.0, 0.0], [0.0, 3.0, 1.0]])  # top 3: 5, 4, the first 3
    rows, cols = sparse.batch_topk_indices(pre, k=1)
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [0, 2, 1]


def _grads_of(sae: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    if not loss.requires_grad:  # the compact AuxK with nothing dead: a constant 0
        return {}
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_dead", [0, 3, 40])  # none, fewer than aux_k (8), more
def test_fixed_auxk_equals_the_compact_one(monkeypatch, n_dead):
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_sae=D_SAE, k=4, aux_k=8, dead_steps_threshold=5), D_IN)
    sae.steps_since_fired[torch.randperm(D_SAE)[:n_dead]] = 5
    x = torch.randn(BATCH, D_IN)
    sae.fit_to_data(x, x)
    results = {}
    for selection in ("compact", "fixed"):
        monkeypatch.setattr(sparse, "KERNELS", sparse.Kernels(selection=selection))
        pre = sparse.dense_pre_acts(x - sae.b_dec.detach(), sae.W_enc, sae.b_enc)
        residual = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
        loss = sae.auxk_loss(pre, x - sae.b_dec.detach(), residual, sae.dead_latents(), sae.b_dec)
        results[selection] = (loss.detach(), _grads_of(sae, loss))
    (want, want_grads), (got, got_grads) = results["compact"], results["fixed"]
    assert (float(want) == 0.0) == (n_dead == 0)
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
    assert want_grads.keys() <= got_grads.keys() and (want_grads or n_dead == 0)
    for name, grad in got_grads.items():
        want_grad = want_grads.get(name, torch.zeros_like(grad))  # no gradient: a zero one
        assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-7), name


def test_fixed_matryoshka_levels_equal_the_compact_ones(monkeypatch):
    torch.manual_seed(0)
    cfg = MatryoshkaBatchTopKSAEConfig(d_sae=D_SAE, k=4, aux_k=0, matryoshka_widths=[16, 32])
    sae = MatryoshkaBatchTopKSAE(cfg, D_IN)
    x = torch.randn(BATCH, D_IN)
    sae.fit_to_data(x, x)
    results = {}
    for selection in ("compact", "fixed"):
        monkeypatch.setattr(sparse, "KERNELS", sparse.Kernels(selection=selection))
        out = sae(x, x, 0)
        results[selection] = ({k: v.detach() for k, v in out.losses.items()}, _grads_of(sae, sum(out.losses.values())))
    (want, want_grads), (got, got_grads) = results["compact"], results["fixed"]
    assert want.keys() == got.keys() == {"mse", "mse_prefix_16", "mse_prefix_32"}
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], rtol=1e-6, atol=1e-7), name


# --- a non-finite step is skipped on the device; the host learns at the next read -----------


def _snapshot(member: Member) -> dict[str, torch.Tensor]:
    state = {f"sae.{k}": v.clone() for k, v in member.sae.state_dict().items()}
    for i, s in enumerate(member.optimizer.state.values()):
        state.update({f"opt{i}.{k}": v.clone() for k, v in s.items()})
    state["tokens_since_fired"] = member.tokens_since_fired.clone()
    return state


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> list[str]:
    """Names whose tensors differ (NaN equals NaN)."""
    return [k for k in a if k not in skip and not torch.equal(a[k].nan_to_num(), b[k].nan_to_num())]


def test_a_nonfinite_step_changes_nothing_and_is_made_up_after_the_next_read(tmp_path, gpu_choices, caplog):
    member = make_member(tmp_path, "batchtopk", total_steps=100, log_every=4)
    good = batches(5)
    bad = good[1].clone()
    bad[3, 2] = float("nan")
    step(member, good[0])
    before = _snapshot(member)
    with caplog.at_level(logging.WARNING):
        step(member, bad)
        # Nothing changed on the device: weights, Adam's moments and step, threshold, counters
        # (the SAE's own firing counter is the exception: it counts every batch it sees).
        assert _same(before, _snapshot(member), skip={"sae.steps_since_fired"}) == []
        assert member.step == 2 and not caplog.records  # the host does not know yet
        step(member, good[2])
        step(member, good[3])  # host step 4: a logging step reads back
    assert member.step == 3  # three applied: the skipped one is made up
    assert member.scheduler.last_epoch == 3
    assert [r.getMessage() for r in caplog.records] == [
        "step 1: non-finite loss (nan) or gradient norm (nan); step skipped (1 in a row)"
    ]
    assert not (tmp_path / "metrics.jsonl").read_text()  # true step 3 logs nothing
    step(member, good[4])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"step": 4' in lines[0] and member.error is None


def test_a_diverged_member_is_frozen_until_the_read_that_ends_it(tmp_path, gpu_choices):
    member = make_member(tmp_path, "topk", total_steps=100, log_every=4, max_nonfinite_steps=2)
    good = batches(2)
    bad = torch.full((BATCH, D_IN), float("inf"))
    step(member, good[0])
    after_one = _snapshot(member)
    step(member, bad)
    step(member, bad)
    # Diverged on the device: this finite step must not be applied either.
    step(member, good[1])
    assert isinstance(member.error, UserError)
    assert "training diverged: 2 steps in a row had a non-finite loss or gradient (at step 1)" in str(member.error)
    assert member.step == 1
    assert _same(after_one, _snapshot(member), skip={"sae.steps_since_fired"}) == []


def test_before_a_checkpoint_everything_is_read_back_and_a_diverged_member_fails(tmp_path, gpu_choices, reads):
    calls, _ = reads
    member = make_member(tmp_path, "standard", total_steps=100, log_every=50, max_nonfinite_steps=1)
    x = batches(1)[0]
    step(member, x)
    assert calls == []  # not a logging step
    assert read_back([member], lambda: 1.0, everything=True) == []
    assert calls == [3] and member.step == 1 and member.error is None  # [applied, loss, norm] of 1 step
    read_back([member], lambda: 1.0, everything=True)
    assert calls == [3]  # nothing new: no read
    bad = torch.full((BATCH, D_IN), float("nan"))
    step(member, bad)
    assert read_back([member], lambda: 1.0, everything=True) == [member]
    assert isinstance(member.error, UserError) and member.step == 1


def test_a_group_reads_back_once_per_logging_step(tmp_path, gpu_choices, reads):
    """Members of a group on the same logging step share one transfer; each gets its own
    values (its metrics line equals the one it writes alone)."""
    calls, counter = reads
    archs = ["batchtopk", "jumprelu", "topk"]
    group = [make_member(tmp_path / a, a, total_steps=100, log_every=2) for a in archs]
    data = batches(4)
    for x in data:
        with SyncCounter() as mode:
            counter["mode"] = mode
            for member in group:
                member.train_step(x, x)
            read_back(group, lambda: 1.0)
        assert not mode.syncs, dict(mode.syncs)
    assert len(calls) == 2  # steps 2 and 4
    alone = make_member(tmp_path / "alone", "jumprelu", total_steps=100, log_every=2)
    for x in data:
        step(alone, x)
    assert (tmp_path / "jumprelu" / "metrics.jsonl").read_text() == (tmp_path / "alone" / "metrics.jsonl").read_text()


def test_without_a_fused_optimizer_the_host_skips_the_step(tmp_path):
    """Devices with no fused Adam (found_inf): a non-finite step is skipped on the host."""
    member = make_member(tmp_path, "standard", total_steps=100, log_every=50)
    member.optimizer.defaults["fused"] = None
    for group in member.optimizer.param_groups:
        group["fused"] = None
    x = batches(1)[0]
    step(member, x)
    before = _snapshot(member)
    step(member, torch.full((BATCH, D_IN), float("nan")))
    assert _same(before, _snapshot(member)) == [] and not hasattr(member.optimizer, "found_inf")
    step(member, x)
    assert "sae.W_enc" in _same(before, _snapshot(member))
