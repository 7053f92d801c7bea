"""TopK family extras: AuxK dead-latent loss, dead counters, k schedule, Matryoshka BatchTopK."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import train_a_few_steps

from saesweep.errors import UserError
from saesweep.sae import build_sae
from saesweep.sae.batchtopk import BatchTopKSAEConfig
from saesweep.sae.matryoshka import MatryoshkaBatchTopKSAEConfig
from saesweep.sae.topk import TopKSAEConfig, scheduled_k
from saesweep.sae_format.write import save_sae

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


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(aux_k=-1), "sae.aux_k"),
        (dict(aux_k_coefficient=-0.1), "sae.aux_k_coefficient"),
        (dict(dead_steps_threshold=0), "sae.dead_steps_threshold"),
        (dict(initial_k=2), "sae.initial_k"),
        (dict(initial_k=100), "sae.initial_k"),
        (dict(initial_k=8, k_warmup_steps=0), "sae.k_warmup_steps"),
        (dict(k_cold_booting_steps=-1), "sae.k_cold_booting_steps"),
        (dict(k_schedule_type="cosine"), "sae.k_schedule_type"),
        (dict(k_exponential_factor=0.0), "sae.k_exponential_factor"),
    ],
)
def test_invalid_keys_name_themselves(overrides, key):
    with pytest.raises(UserError, match=f"config key '{key}'"):
        TopKSAEConfig(d_sae=64, k=4, **overrides).check()


def test_initial_k_wider_than_the_sae_is_refused_when_the_width_comes_from_expansion():
    with pytest.raises(UserError, match="sae.initial_k"):
        build_sae(TopKSAEConfig(expansion_factor=2, k=2, initial_k=20), d_in=4)


# --- Matryoshka BatchTopK ----------------------------------------------------


def test_matryoshka_prefix_losses_against_hand_computation():
    cfg = MatryoshkaBatchTopKSAEConfig(
        d_sae=6, k=2, matryoshka_widths=[2, 4], normalize_activations="none", apply_b_dec_to_input=False
    )
    sae = build_sae(cfg, d_in=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_ENC))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, 0.3, 0.2, 0.6]))
        sae.W_dec.copy_(torch.tensor(W_DEC))
        sae.b_dec.copy_(torch.tensor([0.5, 0.0, -0.5]))
    assert sae.widths == (2, 4, 6)
    out = sae(torch.tensor(X), torch.tensor(X), step=0)
    # pre t0 = (2, 1, 0, 1.3, 0.7, 0.6), t1 = (0, 3, 1, 0.3, 1.7, 0.1); the batch's
    # 2 x 2 best: t1 l1 = 3, t0 l0 = 2, t1 l4 = 1.7, t0 l3 = 1.3.
    # prefix 2: t0 = b_dec + 2 e1 = (2.5, 0, -.5), t1 = b_dec + 3 e2 = (.5, 3, -.5)
    #   errors vs (2,1,0), (0,3,1): .25+1+.25 = 1.5 and .25+0+2.25 = 2.5
    # prefix 4 adds 1.3 e1 to t0: (3.8, 0, -.5) -> 3.24+1+.25 = 4.49; t1 still 2.5
    # all 6 add 1.7 e2 to t1: (.5, 4.7, -.5) -> .25+2.89+2.25 = 5.39
    assert out.losses["mse_prefix_2"].item() == pytest.approx((1.5 + 2.5) / 2)
    assert out.losses["mse_prefix_4"].item() == pytest.approx((4.49 + 2.5) / 2)
    assert out.losses["mse"].item() == pytest.approx((4.49 + 5.39) / 2)
    assert {k for k in out.losses if k.startswith("mse")} == {"mse", "mse_prefix_2", "mse_prefix_4"}
    assert torch.allclose(out.recon, torch.tensor([[3.8, 0.0, -0.5], [0.5, 4.7, -0.5]]))


def test_matryoshka_sparse_path_matches_dense_reference_with_gradients():
    torch.manual_seed(3)
    widths = [8, 24]
    cfg = MatryoshkaBatchTopKSAEConfig(d_sae=64, k=4, matryoshka_widths=widths, aux_k=0, normalize_activations="none")
    sae = build_sae(cfg, d_in=16).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(32, 16, dtype=torch.float64)
    out = sae(x, x, step=0)
    sum(out.losses.values()).backward()
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    sparse_grads = [p.grad.clone() for p in params]
    sae.zero_grad()

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    acts = sae.activation(pre)
    assert {w for w in widths if ((acts[:, :w] != 0).any(1) & (acts[:, w:] != 0).any(1)).any()} == set(widths)
    dense = {f"mse_prefix_{w}": (acts[:, :w] @ sae.W_dec[:w] + sae.b_dec - x).pow(2).sum(-1).mean() for w in widths}
    dense["mse"] = (acts @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    sum(dense.values()).backward()

    assert set(out.losses) == set(dense)
    for name, value in dense.items():
        assert out.losses[name].item() == pytest.approx(value.item(), rel=1e-10), name
    for got, p in zip(sparse_grads, params):
        assert torch.allclose(got, p.grad, atol=1e-6)


def test_matryoshka_widths_validated_and_completed_with_the_sae_width():
    def widths(ws, **kw):
        cfg = MatryoshkaBatchTopKSAEConfig(k=2, matryoshka_widths=ws, **kw)
        cfg.check()
        return build_sae(cfg, d_in=4).widths

    assert widths([4, 16], d_sae=32) == (4, 16, 32)
    assert widths([4, 32], d_sae=32) == (4, 32)
    assert widths([8], expansion_factor=4) == (8, 16)
    for bad in ([], [0, 8], [8, 8], [16, 8], [8, 64]):
        with pytest.raises(UserError, match="config key 'sae.matryoshka_widths'"):
            widths(bad, d_sae=32)
    with pytest.raises(UserError, match="config key 'sae.matryoshka_widths'"):
        widths([8, 64], expansion_factor=4)  # width known only once d_in is


def test_matryoshka_export_loads_in_sae_lens_with_identical_encode_decode(tmp_path):
    from sae_lens import SAE as LensSAE

    torch.manual_seed(0)
    cfg = MatryoshkaBatchTopKSAEConfig(
        d_sae=48, k=6, matryoshka_widths=[6, 18], normalize_activations="expected_average_only_in"
    )
    sae = build_sae(cfg, d_in=16)
    x = 30 * torch.randn(512, 16) + 5  # far from unit scale, so the folded scaling matters
    train_a_few_steps(sae, x)

    save_sae(sae, tmp_path / "sae", {"model_name": "test", "hook_name": "blocks.0.hook_resid_post"})
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu"
    assert saved["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    lens = LensSAE.load_from_disk(str(tmp_path / "sae"))
    probe = 30 * torch.randn(64, 16) + 5
    with torch.no_grad():
        ours, theirs = sae.encode(probe), lens.encode(probe)
        assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)
        assert torch.allclose(lens.decode(theirs), sae.decode(ours), rtol=1e-5, atol=1e-4)
    assert (ours != 0).any()


# --- CLI end to end ----------------------------------------------------------


def test_cli_topk_with_auxk_and_k_schedule(tiny_lm, tmp_path):
    from conftest import TINY_RUN, run_in_process

    import saesweep.train

    argv = [
        "architecture=topk",
        *tiny_lm,
        *TINY_RUN,
        "sae.expansion_factor=32",  # 1024 latents for 32 dims: some stay silent for a step
        "sae.k=16",
        "sae.aux_k=32",
        "sae.dead_steps_threshold=1",
        "sae.initial_k=64",
        "sae.k_warmup_steps=4",
        "sae.k_schedule_type=exponential",
        f"hydra.run.dir={tmp_path}",
    ]
    code, out = run_in_process(saesweep.train.cli, argv)
    assert code == 0, out[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/auxk" in r for r in lines)
    # a latent silent for one step is dead here, so some step has AuxK at work
    assert any(r["loss/auxk"] > 0 for r in lines)
    by_step = {r["step"]: r for r in lines}
    # logged after steps 0-1 (k = 64, then decaying) vs. the last ones (k = 16)
    assert by_step[2]["l0"] > 16 and by_step[8]["l0"] <= 16
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["k"] == 16


def test_cli_matryoshka_batchtopk(tiny_lm, tmp_path):
    from conftest import TINY_RUN, run_in_process
    from sae_lens import SAE as LensSAE

    import saesweep.train

    argv = [
        "architecture=matryoshka_batchtopk",
        *tiny_lm,
        *TINY_RUN,
        "sae.k=16",
        "sae.matryoshka_widths=[16,32]",
        f"hydra.run.dir={tmp_path}",
    ]
    code, out = run_in_process(saesweep.train.cli, argv)
    assert code == 0, out[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # TINY_RUN's width on the tiny model is 2 x 32 = 64: levels 16, 32 and the whole SAE
    for r in lines:
        assert math.isfinite(r["loss/mse_prefix_16"]) and math.isfinite(r["loss/mse_prefix_32"])
        assert r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss/")), rel=1e-5)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["explained_variance"] > 0.2
    assert LensSAE.load_from_disk(str(tmp_path / "sae")).cfg.d_sae == 64
