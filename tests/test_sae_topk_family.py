"""TopK family extras: AuxK dead-latent loss, dead counters, k schedule, Matryoshka BatchTopK."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saesweep.errors import UserError
from saesweep.sae import build_sae
from saesweep.sae.batchtopk import BatchTopKSAEConfig
from saesweep.sae.topk import TopKSAEConfig, scheduled_k

# d_in = 3, d_sae = 6. Decoder rows e1, e2, e3, e1, e2, e3; latents 3-5 read the
# input at half strength (latent 5 with a sign flip), so their pre-activations are
# small, exact and sometimes negative.
W_ENC = [
    [1.0, 0.0, 0.0, 0.5, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0, 0.5, 0.0],
    [0.0, 0.0, 1.0, 0.0, 0.0, -0.5],
]
W_DEC = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
X = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]


def tiny_topk(**kw):
    cfg = TopKSAEConfig(d_sae=6, k=1, normalize_activations="none", apply_b_dec_to_input=False, **kw)
    sae = build_sae(cfg, d_in=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_ENC))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor(W_DEC))
        sae.b_dec.zero_()
    return sae


def mark_dead(sae, latents):
    with torch.no_grad():
        sae.steps_since_fired[latents] = sae.cfg.dead_steps_threshold


# --- AuxK --------------------------------------------------------------------


def test_auxk_loss_against_hand_computation_with_three_dead_latents():
    sae = tiny_topk(aux_k=2, aux_k_coefficient=0.5, dead_steps_threshold=10)
    mark_dead(sae, [3, 4, 5])
    out = sae(torch.tensor(X), torch.tensor(X), step=0)
    # TopK(1): token 0 keeps latent 0 (pre 2) -> recon (2,0,0), residual (0,1,0);
    # token 1 keeps latent 1 (pre 3) -> recon (0,3,0), residual (0,0,1).
    assert out.recon.tolist() == [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]
    # Dead pre-acts: token 0 (1, 0.5, 0) -> top 2 = latents 3, 4 -> (1, 0.5, 0);
    #   error vs (0,1,0) = (1, -0.5, 0) -> 1.25.
    # token 1 (0, 1.5, -0.5) -> top 2 = latents 4, 3 -> (0, 1.5, 0);
    #   error vs (0,0,1) = (0, 1.5, -1) -> 3.25.
    # 3 dead >= aux_k = 2, so no down-scaling: 0.5 * (1.25 + 3.25) / 2.
    assert out.losses["auxk"].item() == pytest.approx(0.5 * (1.25 + 3.25) / 2)
    assert out.losses["mse"].item() == pytest.approx((1.0 + 1.0) / 2)


def test_auxk_scaled_down_with_few_dead_and_uses_raw_negative_pre_acts():
    sae = tiny_topk(aux_k=2, aux_k_coefficient=0.5, dead_steps_threshold=10)
    mark_dead(sae, [5])
    out = sae(torch.tensor(X), torch.tensor(X), step=0)
    # Only latent 5 is dead: k_aux = 1, scale = 1/2. Its pre-acts are 0 and -0.5.
    # token 0: aux recon 0, error (0,1,0) -> 1; token 1: aux recon (0,0,-0.5),
    # error vs (0,0,1) = 1.5^2 = 2.25.
    assert out.losses["auxk"].item() == pytest.approx(0.5 * 0.5 * (1.0 + 2.25) / 2)


def test_auxk_zero_without_dead_latents_and_absent_when_off():
    sae = tiny_topk(aux_k=2, dead_steps_threshold=10)
    out = sae(torch.tensor(X), torch.tensor(X), step=0)
    assert out.losses["auxk"].item() == 0.0
    off = tiny_topk(aux_k=0)
    mark_dead(off, [3, 4, 5])
    assert "auxk" not in off(torch.tensor(X), torch.tensor(X), step=0).losses
    off = tiny_topk(aux_k_coefficient=0.0)
    mark_dead(off, [3, 4, 5])
    assert "auxk" not in off(torch.tensor(X), torch.tensor(X), step=0).losses


def test_auxk_default_is_half_the_reconstructed_width():
    assert build_sae(TopKSAEConfig(d_sae=32, k=2), d_in=10).aux_k == 5


@pytest.mark.parametrize("cfg_cls", [TopKSAEConfig, BatchTopKSAEConfig])
def test_auxk_sparse_path_matches_dense_reference_with_gradients(cfg_cls):
    torch.manual_seed(0)
    sae = build_sae(cfg_cls(d_sae=40, k=3, aux_k=5, aux_k_coefficient=0.7, normalize_activations="none"), d_in=8)
    sae.double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40)[:12]] = True
    mark_dead(sae, dead.nonzero().squeeze(1))
    x = torch.randn(16, 8, dtype=torch.float64)
    out = sae(x, x, step=0)
    sum(out.losses.values()).backward()
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    sparse_grads = [p.grad.clone() for p in params]
    sae.zero_grad()

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    recon = sae.activation(pre) @ sae.W_dec + sae.b_dec
    mse = (recon - x).pow(2).sum(-1).mean()
    top = torch.where(dead, pre, -torch.inf).topk(5, dim=-1)
    aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    aux = (aux_acts @ sae.W_dec - (x - recon).detach()).pow(2).sum(-1).mean()
    (mse + 0.7 * aux).backward()

    assert out.losses["auxk"].item() == pytest.approx(0.7 * aux.item(), rel=1e-10)
    for got, p in zip(sparse_grads, params):
        assert torch.allclose(got, p.grad, atol=1e-6)


# --- dead counters -----------------------------------------------------------


def test_dead_counter_counts_silent_steps_resets_on_firing_and_survives_state_dict():
    sae = tiny_topk(aux_k=2, dead_steps_threshold=3)
    with torch.no_grad():
        sae.b_enc[0] = 100.0  # latent 0 wins every token
        sae.b_enc[5] = -100.0  # latent 5 never does
    x = torch.tensor(X)
    sae.train()
    for n in range(1, 4):
        sae(x, x, step=n - 1)
        assert int(sae.steps_since_fired[5]) == n and int(sae.steps_since_fired[0]) == 0
        assert bool(sae.dead_latents()[5]) == (n >= 3)
    assert not sae.dead_latents()[0]

    restored = tiny_topk(aux_k=2, dead_steps_threshold=3)
    restored.load_state_dict(sae.state_dict())
    assert torch.equal(restored.steps_since_fired, sae.steps_since_fired)
    assert bool(restored.dead_latents()[5])

    sae.eval()  # evaluation passes leave the counters alone
    sae(x, x, step=3)
    assert int(sae.steps_since_fired[5]) == 3

    sae.train()
    with torch.no_grad():
        sae.b_enc[5] = 200.0  # now latent 5 wins
    sae(x, x, step=3)
    assert int(sae.steps_since_fired[5]) == 0 and not sae.dead_latents()[5]
    assert int(sae.steps_since_fired[0]) == 1


# --- k schedule --------------------------------------------------------------


def test_linear_k_schedule_with_cold_booting():
    kw = dict(k=4, initial_k=20, warmup_steps=6, cold_booting_steps=2, schedule_type="linear")
    # k = initial_k while cold, then 20 + (4 - 20) * min(1, (step - 2) / 6), rounded up.
    want = {0: 20, 1: 20, 2: 20, 3: math.ceil(20 - 16 / 6), 5: 12, 7: math.ceil(20 - 16 * 5 / 6), 8: 4, 100: 4}
    assert {s: scheduled_k(s, **kw) for s in want} == want
    assert want[3] == 18 and want[7] == 7


def test_exponential_k_schedule():
    kw = dict(k=4, initial_k=20, warmup_steps=8, schedule_type="exponential", exponential_factor=3.0)
    for step in (0, 1, 4, 7, 8, 50):
        p = min(1.0, step / 8)
        want = max(4, math.ceil(20 - 16 * (1 - math.exp(-3 * p)) / (1 - math.exp(-3))))
        assert scheduled_k(step, **kw) == want
    # faster than linear early on: at half way 20 - 16 * 0.8176 = 6.92 -> 7 (linear: 12)
    assert scheduled_k(4, **kw) == 7 and scheduled_k(0, **kw) == 20 and scheduled_k(8, **kw) == 4


def test_no_schedule_by_default():
    assert [scheduled_k(s, 8, None, 1000) for s in (0, 10, 10_000)] == [8, 8, 8]


@pytest.mark.parametrize("cfg_cls", [TopKSAEConfig, BatchTopKSAEConfig])
def test_forward_uses_the_scheduled_k_and_inference_the_final_k(cfg_cls):
    cfg = cfg_cls(d_sae=32, k=2, initial_k=10, k_warmup_steps=4, normalize_activations="none")
    cfg.check()
    sae = build_sae(cfg, d_in=4)
    with torch.no_grad():
        sae.b_enc.fill_(50.0)  # every pre-activation positive, so L0 is exactly the k used
    x = torch.randn(8, 4)
    assert [sae(x, x, step=s).l0.item() for s in (0, 2, 4)] == [10.0, 6.0, 2.0]
    sae.calibrate(x)
    assert (sae.encode(x) != 0).sum(-1).float().mean().item() == pytest.approx(2.0, abs=0.2)


@pytest.mark.parametrize("overrides, key", [
    (dict(aux_k=-1), "sae.aux_k"),
    (dict(aux_k_coefficient=-0.1), "sae.aux_k_coefficient"),
    (dict(dead_steps_threshold=0), "sae.dead_steps_threshold"),
    (dict(initial_k=2), "sae.initial_k"),
    (dict(initial_k=100), "sae.initial_k"),
    (dict(initial_k=8, k_warmup_steps=0), "sae.k_warmup_steps"),
    (dict(k_cold_booting_steps=-1), "sae.k_cold_booting_steps"),
    (dict(k_schedule_type="cosine"), "sae.k_schedule_type"),
    (dict(k_exponential_factor=0.0), "sae.k_exponential_factor"),
])
def test_invalid_keys_name_themselves(overrides, key):
    with pytest.raises(UserError, match=f"config key '{key}'"):
        TopKSAEConfig(d_sae=64, k=4, **overrides).check()


def test_initial_k_wider_than_the_sae_is_refused_when_the_width_comes_from_expansion():
    with pytest.raises(UserError, match="sae.initial_k"):
        build_sae(TopKSAEConfig(expansion_factor=2, k=2, initial_k=20), d_in=4)


# --- CLI end to end ----------------------------------------------------------


def test_cli_topk_with_auxk_and_k_schedule(tmp_path):
    from conftest import TINY_RUN, run_cli

    proc = run_cli(
        "saesweep.train", "architecture=topk", *TINY_RUN, "sae.k=16", "sae.aux_k=32",
        "sae.dead_steps_threshold=1", "sae.initial_k=64", "sae.k_warmup_steps=4",
        "sae.k_schedule_type=exponential", f"hydra.run.dir={tmp_path}", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/auxk" in r for r in lines)
    # a latent silent for one step is dead here, so some step has AuxK at work
    assert any(r["loss/auxk"] > 0 for r in lines)
    by_step = {r["step"]: r for r in lines}
    # logged after steps 0-1 (k = 64, then decaying) vs. the last ones (k = 16)
    assert by_step[2]["l0"] > 16 and by_step[8]["l0"] <= 16
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["k"] == 16
