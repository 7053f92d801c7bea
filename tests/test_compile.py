"""training.compile (issue 17, item 3): the SAE step's forward, losses and backward compiled,
for a member alone and for a stack of members, equal the eager step within float
tolerance; a compilation that fails warns once, naming training.compile, and training goes
on eager. Compilation takes seconds per graph on a small CPU: few, tiny steps."""

from __future__ import annotations

import logging

import pytest
import torch
from test_stacked import MIXED, SWEEP, batches, make_member, member_arch, state, sweep, train

from saesweep.sae import sparse
from saesweep.training import compiled
from saesweep.training.member import read_back
from saesweep.training.stacked import MemberStack, Steppers


def assert_close(a, b) -> None:
    for name, want in state(b).items():
        torch.testing.assert_close(state(a)[name].float(), want.float(), rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


# The CPU's kernel choices, and the GPU's (fixed-size selections, dense encoder gradient).
CHOICES = {"cpu": sparse.Kernels(), "cuda": sparse.Kernels("dense", "sparse", "fixed")}


@pytest.mark.parametrize("choices", CHOICES)
def test_a_compiled_member_equals_the_eager_one(tmp_path, caplog, monkeypatch, choices):
    # AOTAutograd's graphs run by eager kernels: what compilation changes, without the
    # inductor's code generation (seconds per graph here; the slow test below runs it).
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    monkeypatch.setattr(sparse, "KERNELS", CHOICES[choices])
    data = batches(4)
    eager = make_member(tmp_path / "eager", "batchtopk")
    fast = make_member(tmp_path / "fast", "batchtopk", **{"training.compile": True})
    with caplog.at_level(logging.WARNING):
        train([eager], data, stacked=False)
        train([fast], data[:2], stacked=False)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        train([fast], data[2:], stacked=False)
    assert fast.sae_step.compiled is not None and fast.sae_step.failure is None
    assert "training.compile" not in caplog.text
    # Compiled by the second step (the step number becomes symbolic there); later steps reuse it.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert fast.step == eager.step == 4
    assert_close(fast, eager)


@pytest.mark.parametrize("arch", ["topk", MIXED, "matryoshka_batchtopk", "jumprelu", "gated"])
def test_a_compiled_stack_equals_the_eager_stack(tmp_path, monkeypatch, arch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    data = batches(3)
    settings = sweep(arch, SWEEP[:2])
    eager = [make_member(tmp_path / f"e{i}", member_arch(arch, i), **s) for i, s in enumerate(settings)]
    fast = [
        make_member(tmp_path / f"c{i}", member_arch(arch, i), **s, **{"training.compile": True})
        for i, s in enumerate(settings)
    ]
    train(eager, data, stacked=True)
    steppers = Steppers()
    for x in data:
        for stepper in steppers.covering(fast):
            stepper.train_step(x, x)
        read_back(fast, lambda: 1.0)
    stack = [s for s in steppers.steppers if isinstance(s, MemberStack)]
    assert len(stack) == 1  # compiled members stack as eager ones do
    assert stack[0].sae_step.compiled is not None and stack[0].sae_step.failure is None
    for a, b in zip(fast, eager):
        assert a.step == b.step == 3
        assert_close(a, b)


def test_with_the_gpus_kernels_the_step_is_one_graph(tmp_path, monkeypatch):
    """No graph break in the forward (and so in its backward) of a member or a stack, with the
    GPU's choices: fixed-size selections, and a decoder that is one op (here the dense one;
    on a GPU embedding_bag, whose CPU-only bit-exact backward breaks the graph on a CPU)."""
    monkeypatch.setattr(sparse, "KERNELS", sparse.Kernels("dense", "dense", "fixed"))
    x = batches(1)[0]
    for arch in ["batchtopk", "topk", MIXED, "matryoshka_batchtopk"]:
        members = [make_member(tmp_path / f"{arch}{i}", member_arch(arch, i)) for i in range(2)]
        explained = torch._dynamo.explain(members[0].forward_loss)(x, x, 0)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        explained = torch._dynamo.explain(MemberStack(members).forward_loss)(x, x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_a_failed_compilation_warns_once_and_training_goes_on_eager(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(compiled, "FORCE_FAILURE", "no C++ compiler here")
    data = batches(3)
    eager = make_member(tmp_path / "eager", "batchtopk")
    fast = make_member(tmp_path / "fast", "batchtopk", **{"training.compile": True})
    with caplog.at_level(logging.WARNING):
        train([eager], data, stacked=False)
        train([fast], data, stacked=False)
    warnings = [r.getMessage() for r in caplog.records if "training.compile" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0] and "continues eager" in warnings[0]
    assert fast.sae_step.compiled is None and fast.error is None and fast.step == 3
    for name, want in state(eager).items():  # the eager retry took every step as eager does
        assert torch.equal(state(fast)[name].nan_to_num(), want.nan_to_num()), name


def test_a_failure_inside_the_compiled_step_restores_the_sae_state(tmp_path, monkeypatch):
    """A failure after part of the step ran (a later graph of a broken-up step) leaves the
    SAE's running state as before the attempt: the eager retry counts the step once."""
    member = make_member(tmp_path / "m", "batchtopk", **{"training.compile": True})
    forward = member.forward

    def half_then_fail(x, target, step):
        forward(x, target, step)  # mutates steps_since_fired, the threshold EMA
        raise RuntimeError("capture failed")

    member.sae_step.compiled = half_then_fail
    before = {k: v.clone() for k, v in member.sae.named_buffers()}
    eager = make_member(tmp_path / "e", "batchtopk")
    x = batches(1)[0]
    member.train_step(x, x)
    eager.train_step(x, x)
    assert member.sae_step.failure == "RuntimeError: capture failed" and member.error is None
    for name, value in member.sae.named_buffers():
        assert torch.equal(value.nan_to_num(), dict(eager.sae.named_buffers())[name].nan_to_num()), name
    assert any(not torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in member.sae.named_buffers())


@pytest.mark.slow  # the inductor's C++ code generation: about a minute on 2 cores
def test_the_inductor_compiled_step_equals_the_eager_one(tmp_path, caplog):
    data = batches(3)
    eager = make_member(tmp_path / "eager", "batchtopk")
    fast = make_member(tmp_path / "fast", "batchtopk", **{"training.compile": True})
    with caplog.at_level(logging.WARNING):
        train([eager], data, stacked=False)
        train([fast], data, stacked=False)
    assert compiled.BACKEND == "inductor" and fast.sae_step.failure is None, caplog.text
    assert_close(fast, eager)
