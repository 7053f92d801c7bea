"""Gated and JumpReLU SAEs: loss terms against hand-written formulas, the straight-through
gradients against the rectangle-kernel formulas, per-group lr multipliers, SAELens
export, config errors, and one CLI run each."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import TINY_RUN, run_in_process
from torch.func import functional_call

from saesweep.config.schema import OptimizerConfig, SchedulerConfig
from saesweep.errors import UserError
from saesweep.sae import build_sae
from saesweep.sae.gated import GatedSAE, GatedSAEConfig
from saesweep.sae.jumprelu import JumpReLUSAE, JumpReLUSAEConfig, heaviside_step, jumprelu
from saesweep.sae.standard import StandardSAEConfig
from saesweep.sae_format.write import save_sae
from saesweep.training.optim import build_optimizer, build_scheduler, lr_factor

# d_in = 3, d_sae = 4, two tokens: small enough to follow by hand.
X = [[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]]
B_DEC = [0.5, 0.0, -0.5]
W_ENC = [[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -1.0, 2.0], [0.5, 0.0, 1.0, -1.0]]
W_DEC = [[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [-1.0, 1.0, 1.0], [0.5, 0.5, -0.5]]
B_GATE = [0.1, -0.2, 0.3, 0.0]
B_MAG = [-0.5, 0.4, -2.0, 3.0]
R_MAG = [0.0, math.log(2.0), -math.log(2.0), 0.5]
B_ENC = [0.1, -0.2, 0.3, 0.0]
THRESHOLD = [1.2, 1.0, 0.2, 3.0]


# --- plain-Python references ---------------------------------------------------


def centred(t: int) -> list[float]:
    return [X[t][i] - B_DEC[i] for i in range(3)]


def dot_col(v: list[float], W: list[list[float]], j: int) -> float:
    return sum(v[i] * W[i][j] for i in range(len(v)))


def decode(acts: list[float]) -> list[float]:
    return [sum(acts[j] * W_DEC[j][i] for j in range(4)) + B_DEC[i] for i in range(3)]


def sq_err(recon: list[float], t: int) -> float:
    return sum((recon[i] - X[t][i]) ** 2 for i in range(3))


def dec_norm(j: int) -> float:
    return math.sqrt(sum(w * w for w in W_DEC[j]))


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- gated -----------------------------------------------------------------------


def tiny_gated(**kw) -> GatedSAE:
    sae = build_sae(GatedSAEConfig(d_sae=4, b_dec_init="zeros", **kw), d_in=3)
    with torch.no_grad():
        for name, value in [
            ("W_enc", W_ENC),
            ("W_dec", W_DEC),
            ("b_dec", B_DEC),
            ("b_gate", B_GATE),
            ("b_mag", B_MAG),
            ("r_mag", R_MAG),
        ]:
            getattr(sae, name).copy_(tensor(value))
    return sae


def gated_reference(l1: float) -> dict[str, float]:
    mse = aux = l1_sum = 0.0
    cases = set()
    for t in range(2):
        xc = centred(t)
        gate = [dot_col(xc, W_ENC, j) + B_GATE[j] for j in range(4)]
        mag = [math.exp(R_MAG[j]) * dot_col(xc, W_ENC, j) + B_MAG[j] for j in range(4)]
        acts = [max(mag[j], 0.0) if gate[j] > 0 else 0.0 for j in range(4)]
        gate_relu = [max(g, 0.0) for g in gate]
        cases |= {(gate[j] > 0, mag[j] > 0) for j in range(4)}
        mse += sq_err(decode(acts), t)
        aux += sq_err(decode(gate_relu), t)
        l1_sum += sum(gate_relu[j] * dec_norm(j) for j in range(4))
    # the numbers above must exercise every gate/magnitude sign combination
    assert cases == {(True, True), (True, False), (False, True), (False, False)}
    return {"mse": mse / 2, "l1": l1 * l1_sum / 2, "aux_recon": aux / 2}


def test_gated_loss_terms_match_the_hand_written_formulas():
    sae = tiny_gated(l1_coefficient=0.3)
    out = sae(tensor(X), tensor(X), step=0)
    want = gated_reference(0.3)
    assert set(out.losses) == set(want)
    for name, value in want.items():
        assert out.losses[name].item() == pytest.approx(value, rel=1e-5), name


def test_gated_l1_warms_up_linearly():
    sae = tiny_gated(l1_coefficient=0.3, l1_warm_up_steps=4)
    want = gated_reference(0.3)["l1"]
    assert sae(tensor(X), tensor(X), step=0).losses["l1"].item() == pytest.approx(want / 4, rel=1e-5)
    assert sae(tensor(X), tensor(X), step=3).losses["l1"].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_gated_aux_loss_trains_the_gate_only_through_a_frozen_decoder(detach):
    sae = tiny_gated(aux_detach_decoder=detach)
    sae(tensor(X), tensor(X), step=0).losses["aux_recon"].backward()
    assert sae.W_enc.grad.abs().sum() > 0 and sae.b_gate.grad.abs().sum() > 0
    # the magnitude path plays no part in the gate's losses
    assert sae.r_mag.grad is None and sae.b_mag.grad is None
    if detach:
        assert sae.W_dec.grad is None
    else:
        assert sae.W_dec.grad.abs().sum() > 0


def test_gated_gradients_match_finite_differences():
    """Away from the gate's jumps the loss is smooth; autograd must agree with
    finite differences for every parameter (the SAELens variant: nothing detached)."""
    torch.manual_seed(0)
    sae = build_sae(GatedSAEConfig(d_sae=6, aux_detach_decoder=False, l1_coefficient=0.7), d_in=4).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.5)
    x = torch.randn(5, 4, dtype=torch.float64)
    names = [n for n, _ in sae.named_parameters()]
    assert set(names) == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}

    def loss(*params):
        out = functional_call(sae, dict(zip(names, params)), (x, x, 0))
        return sum(out.losses.values())

    params = tuple(p.detach().clone().requires_grad_() for p in sae.parameters())
    assert torch.autograd.gradcheck(loss, params)


# --- jumprelu: the autograd functions ---------------------------------------------

Z = [[0.3, 1.2, -0.5, 2.0], [1.1, 0.45, 0.1, 2.9]]
EPS = 0.5  # window |z - threshold| < 0.25: entries (1,0), (0,1), (1,2), (1,3)


def in_window(t: int, j: int) -> float:
    return 1.0 if abs(Z[t][j] - THRESHOLD[j]) < EPS / 2 else 0.0


def upstream() -> torch.Tensor:
    return torch.tensor([[0.7, -1.3, 2.0, 0.4], [-0.2, 1.1, 0.9, -1.5]], dtype=torch.float64)


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_jumprelu_forward_and_straight_through_gradients(ste_to_input):
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(THRESHOLD, dtype=torch.float64, requires_grad=True)
    G = upstream()
    out = jumprelu(z, theta, EPS, ste_to_input)
    (out * G).sum().backward()

    assert sum(in_window(t, j) for t in range(2) for j in range(4)) == 4
    for t in range(2):
        for j in range(4):
            fires = Z[t][j] > THRESHOLD[j]
            assert out[t, j].item() == (Z[t][j] if fires else 0.0)
            want_z = G[t, j].item() * fires
            if ste_to_input:
                want_z += G[t, j].item() * THRESHOLD[j] / EPS * in_window(t, j)
            assert float(z.grad[t, j]) == pytest.approx(want_z)
    for j in range(4):
        want = -sum(G[t, j].item() * THRESHOLD[j] / EPS * in_window(t, j) for t in range(2))
        assert float(theta.grad[j]) == pytest.approx(want)


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_step_forward_and_straight_through_gradients(ste_to_input):
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(THRESHOLD, dtype=torch.float64, requires_grad=True)
    G = upstream()
    out = heaviside_step(z, theta, EPS, ste_to_input)
    (out * G).sum().backward()
    assert out.tolist() == [[float(Z[t][j] > THRESHOLD[j]) for j in range(4)] for t in range(2)]
    for j in range(4):
        want = -sum(G[t, j].item() / EPS * in_window(t, j) for t in range(2))
        assert float(theta.grad[j]) == pytest.approx(want)
    if ste_to_input:
        want_z = [[G[t, j].item() / EPS * in_window(t, j) for j in range(4)] for t in range(2)]
        assert torch.allclose(z.grad, torch.tensor(want_z, dtype=torch.float64))
    else:
        assert z.grad is None


def test_jumprelu_input_gradient_passes_gradcheck():
    """With the threshold fixed, z H(z - θ) is smooth away from θ: exact gradient H."""
    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(THRESHOLD, dtype=torch.float64) * 0.3
    assert ((z - theta).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(lambda v: jumprelu(v, theta, EPS), (z,))


def test_a_scalar_threshold_gets_the_summed_gradient():
    z = torch.tensor(Z, dtype=torch.float64)
    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    heaviside_step(z, theta, EPS).sum().backward()
    near = sum(abs(v - 0.4) < EPS / 2 for row in Z for v in row)
    assert near > 0 and float(theta.grad) == pytest.approx(-near / EPS)


# --- jumprelu: the SAE's loss terms ------------------------------------------------


def tiny_jumprelu(**kw) -> JumpReLUSAE:
    sae = build_sae(JumpReLUSAEConfig(d_sae=4, b_dec_init="zeros", **kw), d_in=3)
    with torch.no_grad():
        for name, value in [("W_enc", W_ENC), ("W_dec", W_DEC), ("b_dec", B_DEC), ("b_enc", B_ENC)]:
            getattr(sae, name).copy_(tensor(value))
        sae.log_threshold.copy_(tensor(THRESHOLD).log())
    return sae


def jumprelu_pre(t: int) -> list[float]:
    return [dot_col(centred(t), W_ENC, j) + B_ENC[j] for j in range(4)]


def jumprelu_acts(t: int) -> list[float]:
    return [p if p > THRESHOLD[j] else 0.0 for j, p in enumerate(jumprelu_pre(t))]


def test_the_tiny_example_has_latents_on_both_sides_of_their_thresholds():
    fires = {jumprelu_pre(t)[j] > THRESHOLD[j] for t in range(2) for j in range(4)}
    positive_but_below = any(0 < jumprelu_pre(t)[j] <= THRESHOLD[j] for t in range(2) for j in range(4))
    assert fires == {True, False} and positive_but_below


def test_jumprelu_mse_and_step_l0_match_the_hand_written_formulas():
    sae = tiny_jumprelu(sparsity_loss_mode="step", l0_coefficient=0.3, pre_act_loss_coefficient=0.0)
    out = sae(tensor(X), tensor(X), step=0)
    assert set(out.losses) == {"mse", "l0"}
    mse = sum(sq_err(decode(jumprelu_acts(t)), t) for t in range(2)) / 2
    l0 = sum(a != 0 for t in range(2) for a in jumprelu_acts(t)) / 2
    assert out.losses["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out.losses["l0"].item() == pytest.approx(0.3 * l0, rel=1e-5)
    assert float(out.l0) == pytest.approx(l0)


def test_jumprelu_tanh_sparsity_loss_matches_the_formula():
    sae = tiny_jumprelu(sparsity_loss_mode="tanh", tanh_scale=1.5, l0_coefficient=0.3, pre_act_loss_coefficient=0.0)
    got = sae(tensor(X), tensor(X), step=0).losses["l0"].item()
    want = sum(math.tanh(1.5 * a * dec_norm(j)) for t in range(2) for j, a in enumerate(jumprelu_acts(t))) / 2
    assert got == pytest.approx(0.3 * want, rel=1e-5)


def test_jumprelu_l0_coefficient_warms_up_linearly():
    sae = tiny_jumprelu(sparsity_loss_mode="step", l0_coefficient=0.3, l0_warm_up_steps=3)
    full = sum(a != 0 for t in range(2) for a in jumprelu_acts(t)) / 2 * 0.3
    assert sae(tensor(X), tensor(X), step=0).losses["l0"].item() == pytest.approx(full / 3, rel=1e-5)
    assert sae(tensor(X), tensor(X), step=5).losses["l0"].item() == pytest.approx(full, rel=1e-5)


def test_pre_act_loss_covers_only_latents_dead_for_the_window():
    sae = tiny_jumprelu(pre_act_loss_coefficient=0.2, pre_act_dead_after_tokens=5)
    sae.tokens_since_fired.copy_(torch.tensor([0, 10, 5, 4]))
    dead = [False, True, True, False]
    got = sae(tensor(X), tensor(X), step=0).losses["pre_act"].item()
    want = (
        sum(max(THRESHOLD[j] - jumprelu_pre(t)[j], 0.0) * dec_norm(j) for t in range(2) for j in range(4) if dead[j])
        / 2
    )
    assert want > 0 and got == pytest.approx(0.2 * want, rel=1e-5)


def test_fired_counter_resets_latents_that_fired_and_only_in_training():
    sae = tiny_jumprelu()
    sae.tokens_since_fired.copy_(torch.tensor([7, 7, 7, 7]))
    sae.eval()
    sae(tensor(X), tensor(X), step=0)
    assert sae.tokens_since_fired.tolist() == [7, 7, 7, 7]
    sae.train()
    sae(tensor(X), tensor(X), step=0)
    fired = [any(jumprelu_acts(t)[j] != 0 for t in range(2)) for j in range(4)]
    assert sae.tokens_since_fired.tolist() == [0 if f else 9 for f in fired]


def test_log_threshold_gradient_of_the_step_loss_is_the_kernel_formula():
    """d/d log θ of c·mean_t Σ_j H(z - θ) = c/T Σ_t -(1/ε) K((z - θ)/ε) · θ (chain rule through exp)."""
    eps = 1.5
    sae = tiny_jumprelu(sparsity_loss_mode="step", l0_coefficient=0.3, bandwidth=eps, pre_act_loss_coefficient=0.0)
    sae(tensor(X), tensor(X), step=0).losses["l0"].backward()
    for j in range(4):
        kernel = sum(abs(jumprelu_pre(t)[j] - THRESHOLD[j]) < eps / 2 for t in range(2))
        want = 0.3 / 2 * (-kernel / eps) * THRESHOLD[j]
        assert float(sae.log_threshold.grad[j]) == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert sae.log_threshold.grad.abs().sum() > 0


def test_jumprelu_gradients_away_from_thresholds_match_finite_differences():
    torch.manual_seed(1)
    sae = build_sae(
        JumpReLUSAEConfig(d_sae=6, init_threshold=0.3, pre_act_loss_coefficient=0.5, pre_act_dead_after_tokens=1),
        d_in=4,
    ).double()
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).normal_(std=0.5)
    sae.tokens_since_fired.fill_(3)  # every latent counts as dead: pre_act loss is on
    sae.eval()  # keep the counter still while gradcheck re-evaluates
    x = torch.randn(5, 4, dtype=torch.float64)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]

    def loss(*params):
        out = functional_call(sae, dict(zip(names, params)), (x, x, 0))
        assert set(out.losses) == {"mse", "l0", "pre_act"}
        return sum(out.losses.values())

    params = tuple(getattr(sae, n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(loss, params)


# --- optimizer groups ----------------------------------------------------------------


def test_param_groups_cover_every_parameter_once():
    sae = build_sae(JumpReLUSAEConfig(d_sae=8, lr_multiplier=1.0, threshold_lr_multiplier=0.1), d_in=4)
    groups = sae.param_groups()
    assert [g.name for g in groups] == ["main", "threshold"]
    assert groups[1].params == [sae.log_threshold] and groups[1].lr_multiplier == 0.1
    ids = [id(p) for g in groups for p in g.params]
    assert sorted(ids) == sorted(id(p) for p in sae.parameters())
    gated = build_sae(GatedSAEConfig(d_sae=8, lr_multiplier=1.0), d_in=4)
    assert [(g.name, g.lr_multiplier, len(g.params)) for g in gated.param_groups()] == [("main", 1.0, 6)]


def test_threshold_lr_is_its_multiplier_times_the_scheduled_lr():
    sae = build_sae(JumpReLUSAEConfig(d_sae=8, lr_multiplier=1.0, threshold_lr_multiplier=0.1), d_in=4)
    opt_cfg = OptimizerConfig(lr=2e-3)
    sched_cfg = SchedulerConfig(name="cosine", warmup_steps=3, final_lr_fraction=0.2)
    optimizer = build_optimizer(sae.param_groups(), opt_cfg)
    scheduler = build_scheduler(optimizer, 10, sched_cfg)
    main, threshold = optimizer.param_groups
    seen = set()
    for step in range(10):
        factor = lr_factor(step, 10, sched_cfg)
        assert main["lr"] == pytest.approx(2e-3 * factor)
        assert threshold["lr"] == pytest.approx(0.1 * 2e-3 * factor)
        seen.add(round(factor, 6))
        optimizer.step()
        scheduler.step()
    assert len(seen) > 5  # the schedule really moved


def test_one_adam_step_moves_log_thresholds_by_the_multiplied_lr():
    torch.manual_seed(0)
    sae = build_sae(
        JumpReLUSAEConfig(
            d_sae=8, lr_multiplier=1.0, threshold_lr_multiplier=0.25, bandwidth=10.0, sparsity_loss_mode="step"
        ),
        d_in=4,
    )
    optimizer = build_optimizer(sae.param_groups(), OptimizerConfig(lr=1e-2))
    x = torch.randn(16, 4)
    before = sae.log_threshold.detach().clone()
    sum(sae(x, x, 0).losses.values()).backward()
    has_grad = sae.log_threshold.grad != 0
    assert has_grad.any()
    optimizer.step()
    moved = (sae.log_threshold.detach() - before).abs()
    # Adam's first step is lr * g / (|g| + eps): lr in size wherever the gradient is not tiny
    assert torch.allclose(moved[has_grad], torch.full_like(moved[has_grad], 0.25e-2), rtol=1e-3)


def test_lr_multiplier_scales_every_group_of_the_sae():
    """sae.lr_multiplier x optimizer.lr for the main group; JumpReLU's thresholds get
    threshold_lr_multiplier on top: 3 x 2e-3 = 6e-3 and 0.5 x 6e-3 = 3e-3."""
    gated = build_sae(GatedSAEConfig(d_sae=8, lr_multiplier=3.0), d_in=4)
    (main,) = build_optimizer(gated.param_groups(), OptimizerConfig(lr=2e-3)).param_groups
    assert main["lr"] == pytest.approx(6e-3)
    jump = build_sae(JumpReLUSAEConfig(d_sae=8, lr_multiplier=3.0, threshold_lr_multiplier=0.5), d_in=4)
    main, threshold = build_optimizer(jump.param_groups(), OptimizerConfig(lr=2e-3)).param_groups
    assert (main["lr"], threshold["lr"]) == (pytest.approx(6e-3), pytest.approx(3e-3))
    # Adam's first step moves each weight by its group's lr where the gradient is not tiny
    torch.manual_seed(0)
    standard = build_sae(StandardSAEConfig(d_sae=8, lr_multiplier=3.0), d_in=4)
    optimizer = build_optimizer(standard.param_groups(), OptimizerConfig(lr=1e-2))
    x = torch.randn(16, 4)
    before = standard.W_dec.detach().clone()
    sum(standard(x, x, 0).losses.values()).backward()
    has_grad = standard.W_dec.grad.abs() > 1e-4
    optimizer.step()
    moved = (standard.W_dec.detach() - before).abs()
    assert has_grad.any() and torch.allclose(moved[has_grad], torch.full_like(moved[has_grad], 3e-2), rtol=1e-2)


def test_build_optimizer_still_takes_plain_parameters():
    sae = build_sae(GatedSAEConfig(d_sae=8), d_in=4)
    optimizer = build_optimizer(sae.parameters(), OptimizerConfig(lr=1e-3))
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_cpu_optimizer_is_fused_and_steps_like_the_per_parameter_one(name):
    torch.manual_seed(0)
    sae = build_sae(JumpReLUSAEConfig(d_sae=8, threshold_lr_multiplier=0.25), d_in=4)
    cfg = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(sae.param_groups(), cfg)
    assert fused.defaults["fused"]
    twin = copy.deepcopy(sae)
    plain = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    reference = plain(
        [{"params": g.params, "lr": cfg.lr * g.lr_multiplier} for g in twin.param_groups()],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=0.1,
        foreach=False,
    )
    x = torch.randn(16, 4)
    for _ in range(3):
        for model, optimizer in ((sae, fused), (twin, reference)):
            optimizer.zero_grad()
            sum(model(x, x, 0).losses.values()).backward()
            optimizer.step()
    for a, b in zip(sae.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# --- export to SAELens ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_sae_lens_load_from_disk_encodes_and_decodes_like_our_module(arch, tmp_path):
    from sae_lens import SAE as LensSAE
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg_class = {"gated": GatedSAEConfig, "jumprelu": JumpReLUSAEConfig}[arch]
    sae = build_sae(cfg_class(d_sae=48, normalize_activations="expected_average_only_in"), d_in=16)
    x = 30 * torch.randn(512, 16) + 5  # far from unit scale, so folding input_scale matters
    sae.fit_to_data(x, x)
    assert abs(float(sae.input_scale) - 1) > 0.5
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "log_threshold":
                p.uniform_(-3, 0)  # thresholds 0.05..1, so some latents fire and some not
            elif name != "b_dec":
                p.normal_(std=0.3)
    sae.eval()

    save_sae(sae, tmp_path / "sae", {"model_name": "test", "hook_name": "blocks.0.hook_resid_post"})
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved["architecture"] == arch and saved["normalize_activations"] == "none"
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    if arch == "jumprelu":
        # θ acts on pre-activations, which input scaling (folded into W_enc) leaves unchanged
        assert torch.allclose(weights["threshold"], sae.log_threshold.detach().exp())
    else:
        assert "b_enc" not in weights and {"b_gate", "b_mag", "r_mag"} <= set(weights)
    lens = LensSAE.load_from_disk(str(tmp_path / "sae"))
    assert type(lens).__name__ == {"gated": "GatedSAE", "jumprelu": "JumpReLUSAE"}[arch]

    probe = 30 * torch.randn(64, 16) + 5
    with torch.no_grad():
        ours, theirs = sae.encode(probe), lens.encode(probe)
        assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)
        assert torch.allclose(lens.decode(theirs), sae.decode(ours), rtol=1e-5, atol=1e-4)
    active = (ours != 0).float().mean()
    assert 0.05 < active < 0.95
    if arch == "jumprelu":
        # the thresholds matter: a plain ReLU would let more latents through
        assert ((sae.pre_acts(probe * sae.input_scale) > 0) & (ours == 0)).any()
    else:
        # the gate matters: some latents with positive magnitude are gated off
        gate_pre, mag_pre = sae.gate_and_magnitude(probe * sae.input_scale)
        assert ((gate_pre <= 0) & (mag_pre > 0)).any()


# --- config validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,key",
    [
        (JumpReLUSAEConfig(bandwidth=0.0), "bandwidth"),
        (JumpReLUSAEConfig(bandwidth=-1.0), "bandwidth"),
        (JumpReLUSAEConfig(init_threshold=0.0), "init_threshold"),
        (JumpReLUSAEConfig(l0_coefficient=-0.1), "l0_coefficient"),
        (JumpReLUSAEConfig(l0_warm_up_steps=-1), "l0_warm_up_steps"),
        (JumpReLUSAEConfig(sparsity_loss_mode="quadratic"), "sparsity_loss_mode"),
        (JumpReLUSAEConfig(tanh_scale=0.0), "tanh_scale"),
        (JumpReLUSAEConfig(pre_act_loss_coefficient=-1e-6), "pre_act_loss_coefficient"),
        (JumpReLUSAEConfig(pre_act_dead_after_tokens=0), "pre_act_dead_after_tokens"),
        (JumpReLUSAEConfig(threshold_lr_multiplier=-0.1), "threshold_lr_multiplier"),
        (GatedSAEConfig(l1_coefficient=-1.0), "l1_coefficient"),
        (GatedSAEConfig(l1_warm_up_steps=-2), "l1_warm_up_steps"),
    ],
)
def test_bad_values_are_refused_by_key(cfg, key):
    with pytest.raises(UserError) as err:
        cfg.check()
    message = str(err.value)
    assert message.startswith(f"config key 'sae.{key}': ") and "\n" not in message


def test_unknown_sparsity_loss_mode_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"valid: step, tanh"):
        JumpReLUSAEConfig(sparsity_loss_mode="l1").check()


def test_the_defaults_are_valid():
    JumpReLUSAEConfig().check()
    GatedSAEConfig().check()


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["architecture=jumprelu", "sae.bandwidth=0"], "sae.bandwidth"),
        (["architecture=jumprelu", "sae.sparsity_loss_mode=l1"], "sae.sparsity_loss_mode"),
        (["architecture=gated", "sae.l1_coefficient=-1"], "sae.l1_coefficient"),
    ],
)
def test_cli_prints_one_error_line_naming_the_key(tmp_path, overrides, key):
    import saesweep.train

    code, out = run_in_process(saesweep.train.cli, [*overrides, f"hydra.run.dir={tmp_path}"])
    assert code == 2, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: config key '{key}': "), out
    assert "Traceback" not in out


# --- end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["gated", "jumprelu"])
def trained_run(request, tiny_lm, tmp_path_factory):
    import saesweep.train

    arch = request.param
    run_dir = tmp_path_factory.mktemp(f"run-{arch}")
    extra = ["sae.l1_coefficient=0.5"] if arch == "gated" else []
    argv = [f"architecture={arch}", *tiny_lm, *TINY_RUN, *extra, f"hydra.run.dir={run_dir}"]
    code, out = run_in_process(saesweep.train.cli, argv)
    assert code == 0, out[-3000:]
    return arch, run_dir


def test_cli_run_completes_and_writes_the_contract_files(trained_run):
    from sae_lens import SAE as LensSAE

    arch, run_dir = trained_run
    for name in ("eval.json", "metrics.jsonl", "sae/cfg.json", "sae/sae_weights.safetensors"):
        assert (run_dir / name).exists(), name
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["tokens_trained"] == 8192
    assert 0 < result["l0"] and math.isfinite(result["explained_variance"])
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    terms = {"gated": {"loss/mse", "loss/l1", "loss/aux_recon"}, "jumprelu": {"loss/mse", "loss/l0", "loss/pre_act"}}
    assert terms[arch] <= set(last)
    lens = LensSAE.load_from_disk(str(run_dir / "sae"))
    assert lens.cfg.architecture() == arch
