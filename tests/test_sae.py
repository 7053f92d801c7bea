"""Each architecture's forward pass and losses against hand-computed values on tiny tensors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from saesweep.sae import build_sae
from saesweep.sae.base import geometric_median
from saesweep.sae.batchtopk import BatchTopKSAEConfig
from saesweep.sae.standard import StandardSAEConfig
from saesweep.sae.topk import TopKSAEConfig

# d_in = 2, d_sae = 3, weights chosen so every number below is exact.
W_ENC = [[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]
B_ENC = [0.0, -1.0, 0.5]
W_DEC = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
B_DEC = [0.5, 0.5]


def tiny(cfg):
    sae = build_sae(cfg, d_in=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_ENC))
        sae.b_enc.copy_(torch.tensor(B_ENC))
        sae.W_dec.copy_(torch.tensor(W_DEC))
        sae.b_dec.copy_(torch.tensor(B_DEC))
    return sae


def test_standard_forward_and_l1_weighted_by_decoder_norms():
    # l1_warm_up_steps=0: the full coefficient at step 0 (the default warms it up over 61 steps).
    sae = tiny(StandardSAEConfig(d_sae=3, l1_coefficient=0.5, l1_warm_up_steps=0, normalize_activations="none"))
    x = torch.tensor([[1.5, 2.5]])
    # x - b_dec = (1, 2); pre = (1, 1, 1.5); recon = (2,0)+(0,1)+1.5(1,1)+b_dec = (4, 3)
    out = sae(x, x, step=0)
    assert out.recon.tolist() == [[4.0, 3.0]]
    assert out.losses["mse"].item() == pytest.approx(2.5**2 + 0.5**2)
    assert out.losses["l1"].item() == pytest.approx(0.5 * (1 * 2 + 1 * 1 + 1.5 * math.sqrt(2)))
    assert out.l0.item() == 3 and out.fired.tolist() == [True, True, True]


def test_standard_l1_warm_up_is_linear():
    sae = tiny(StandardSAEConfig(d_sae=3, l1_coefficient=1.0, l1_warm_up_steps=4, normalize_activations="none"))
    assert [sae.l1_coefficient(s) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]


def test_topk_keeps_k_largest_per_token():
    sae = tiny(TopKSAEConfig(d_sae=3, k=1, normalize_activations="none"))
    x = torch.tensor([[1.5, 2.5]])
    # pre = (1, 1, 1.5): only latent 2 survives; recon = 1.5 (1, 1) + b_dec = (2, 2)
    out = sae(x, x, step=0)
    assert out.recon.tolist() == [[2.0, 2.0]]
    assert out.losses["mse"].item() == pytest.approx(0.5)
    assert sae.encode(x).tolist() == [[0.0, 0.0, 1.5]]
    assert out.fired.tolist() == [False, False, True]


def test_batchtopk_keeps_k_per_token_on_average_over_the_batch():
    sae = tiny(BatchTopKSAEConfig(d_sae=3, k=1, normalize_activations="none"))
    x = torch.tensor([[1.5, 3.5], [0.5, 0.5]])
    # pre rows: (1, 2, 2.5) and (0, -1, 0.5). The 2 best of the batch are both in row 0.
    out = sae(x, x, step=0)
    assert out.recon.tolist() == [[3.0, 5.0], [0.5, 0.5]]
    assert out.losses["mse"].item() == pytest.approx((1.5**2 + 1.5**2 + 0) / 2)
    assert out.l0.item() == 1.0
    # the running threshold after one step is that batch's smallest survivor, committed
    # by after_step (a step the trainer skips as non-finite never gets there)
    assert float(sae.threshold) == 0.0
    sae.after_step()
    assert float(sae.threshold) == pytest.approx(2.0)
    # inference: a JumpReLU at that threshold, row by row
    assert sae.encode(x).tolist() == [[0.0, 0.0, 2.5], [0.0, 0.0, 0.0]]


KERNEL_CHOICES = [("sparse", "sparse"), ("dense", "sparse"), ("sparse", "dense"), ("dense", "dense")]


@pytest.mark.parametrize("encoder_backward,decoder", KERNEL_CHOICES)
@pytest.mark.parametrize("cls_cfg", [TopKSAEConfig, BatchTopKSAEConfig])
def test_sparse_training_path_matches_dense_maths(cls_cfg, encoder_backward, decoder, monkeypatch):
    """Every kernel choice (the GPU's dense ones included) computes the same function."""
    from saesweep.sae import sparse

    monkeypatch.setattr(sparse, "KERNELS", sparse.Kernels(encoder_backward, decoder))
    torch.manual_seed(0)
    cfg = cls_cfg(d_sae=64, k=4, normalize_activations="none")
    sae = build_sae(cfg, d_in=16)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(32, 16)
    out = sae(x, x, step=0)
    out.losses["mse"].backward()
    sparse_grads = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    sae.zero_grad()

    # dense reference: the same maths written plainly
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    acts = sae.activation(pre)
    recon = acts @ sae.W_dec + sae.b_dec
    dense_loss = (recon - x).pow(2).sum(-1).mean()
    dense_loss.backward()
    dense_grads = [p.grad for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]

    assert torch.allclose(out.recon, recon, atol=1e-5)
    assert out.losses["mse"].item() == pytest.approx(dense_loss.item(), rel=1e-5)
    for got, want in zip(sparse_grads, dense_grads):
        assert torch.allclose(got, want, atol=1e-5)


def test_batch_topk_indices_exact_even_when_one_row_dominates():
    from saesweep.sae.sparse import batch_topk_indices

    torch.manual_seed(0)
    pre = torch.randn(8, 100)
    pre[3] += 10.0  # row 3 owns far more than its 4k candidates' worth of winners
    rows, cols = batch_topk_indices(pre, k=5)
    want = set(pre.flatten().topk(40).indices.tolist())
    assert set((rows * 100 + cols).tolist()) == want
    assert torch.all(rows[1:] >= rows[:-1])


def test_batch_topk_indices_exact_with_ties_at_the_cutoff():
    from saesweep.sae.sparse import batch_topk_indices

    pre = torch.zeros(4, 50)
    pre[:, :3] = 1.0  # 12 clear winners, then 188 ties at 0 for the remaining 8 of 20 places
    rows, cols = batch_topk_indices(pre, k=5)
    assert len(rows) == 20 and torch.all(rows[1:] >= rows[:-1])
    assert set(((rows * 50 + cols)[pre[rows, cols] == 1.0]).tolist()) == {
        r * 50 + c for r in range(4) for c in range(3)
    }


def test_batch_topk_indices_take_exactly_n_keep_when_everything_ties():
    from saesweep.sae.sparse import batch_topk_indices

    pre = torch.ones(6, 40)  # bf16 pre-activations tie often; the count must still be k per row
    rows, cols = batch_topk_indices(pre, k=3)
    assert len(rows) == 18 and len(set((rows * 40 + cols).tolist())) == 18
    assert torch.all(rows[1:] >= rows[:-1])


@pytest.mark.parametrize("cls_cfg", [TopKSAEConfig, BatchTopKSAEConfig])
def test_bf16_autocast_step_gives_fp32_gradients_close_to_the_fp32_step(cls_cfg):
    torch.manual_seed(3)
    sae = build_sae(cls_cfg(d_sae=256, k=8, normalize_activations="none"), d_in=32)
    x = torch.randn(128, 32)
    sae.fit_to_data(x, x)
    grads, losses = [], []
    for autocast in (False, True):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sae(x, x, step=0)
            loss = sum(out.losses.values())
        loss.backward()
        grads.append([p.grad for p in sae.parameters()])
        losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], rel=0.01)
    # bf16 rounding moves a few latents across the top-k margin, so not atol-equal: same direction
    for fp32, bf16 in zip(*grads):
        assert bf16.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(bf16.flatten(), fp32.flatten(), dim=0) > 0.99


def test_batch_topk_indices_exact_when_the_sample_overestimates_the_cutoff():
    """The strided sample sees large values that are too few to fill the batch's quota:
    the first pass finds too few entries, and the whole batch is ranked instead."""
    from saesweep.sae import sparse

    torch.manual_seed(4)
    n_rows, d_sae, k = 256, 1024, 8
    pre = torch.randn(n_rows, d_sae)
    flat = pre.view(-1)
    stride = (flat.numel() // sparse.SAMPLE_SIZE) | 1
    flat[0 : 1000 * stride : stride] += 100.0  # 1000 sampled giants, fewer than the 2048 to keep
    assert sparse._entries_likely_above_cutoff(flat, k * n_rows).numel() < k * n_rows  # the trap works
    rows, cols = sparse.batch_topk_indices(pre, k)
    want = flat.topk(k * n_rows).indices.sort().values
    assert torch.equal(rows * d_sae + cols, want)


def test_batch_topk_indices_equal_a_full_ranking_on_random_batches():
    from saesweep.sae.sparse import batch_topk_indices

    torch.manual_seed(1)
    # the last two are past SAMPLE_SIZE entries: the cutoff is estimated from a sample first
    for n_rows, d_sae, k in ((64, 512, 8), (3, 40, 4), (16, 64, 32), (256, 1024, 8), (512, 4608, 32)):
        pre = torch.randn(n_rows, d_sae)
        rows, cols = batch_topk_indices(pre, k)
        want = pre.flatten().topk(min(k * n_rows, pre.numel())).indices.sort().values
        assert torch.equal((rows * d_sae + cols).sort().values, want)  # exactly the winners
        assert torch.all(rows[1:] >= rows[:-1])  # grouped by row, as the sparse kernels need


def test_decoder_rows_renormalised_after_step_for_topk_family():
    sae = build_sae(TopKSAEConfig(d_sae=8, k=2), d_in=4)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(8))


def test_encoder_starts_as_decoder_transpose_with_decoder_init_norm():
    sae = build_sae(StandardSAEConfig(d_sae=8, decoder_init_norm=0.1), d_in=4)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((8,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


@pytest.mark.parametrize(
    "cfg",
    [
        StandardSAEConfig(d_sae=12, normalize_activations="expected_average_only_in"),
        TopKSAEConfig(d_sae=12, k=3, normalize_activations="expected_average_only_in"),
        BatchTopKSAEConfig(d_sae=12, k=3, normalize_activations="expected_average_only_in"),
    ],
)
def test_exported_weights_fold_input_scaling(cfg):
    """The exported tensors, applied to raw activations, give what the SAE gives."""
    torch.manual_seed(1)
    sae = build_sae(cfg, d_in=6)
    x = 50 * torch.randn(64, 6) + 7
    sae.fit_to_data(x, x)
    assert sae.input_scale.item() == pytest.approx(6**0.5 / x.norm(dim=1).mean().item(), rel=1e-5)
    sae.train()
    sae(x, x, step=0)  # lets BatchTopK set its running threshold
    sae.calibrate(x)
    t = sae.export_tensors()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if "threshold" in t:
        acts = pre * (pre > t["threshold"])
    else:
        acts = sae.activation(pre)
    assert torch.allclose(acts, sae.encode(x), atol=1e-4)
    assert torch.allclose(acts @ t["W_dec"] + t["b_dec"], sae.decode(sae.encode(x)), atol=1e-3)


def test_batchtopk_calibration_gives_k_per_token_on_its_sample():
    torch.manual_seed(2)
    sae = build_sae(BatchTopKSAEConfig(d_sae=64, k=4, normalize_activations="none"), d_in=16)
    x = torch.randn(500, 16)
    sae.calibrate(x)
    active = (sae.encode(x) != 0).sum().item()
    assert abs(active - 4 * 500) <= 1


@pytest.mark.parametrize("loud_rows", [slice(0, 0), slice(0, 100), slice(300, 400)])
def test_batchtopk_calibration_is_the_exact_kth_value(loud_rows):
    """Chunks of 100 x 1024 entries are past SAMPLE_SIZE, so each keeps only what clears the
    first chunk's floor. A loud first chunk sets the floor too high: the rest then hold too
    few entries above it and x is encoded again with a lower floor; a loud last chunk only
    means that more entries clear it. Either way the threshold is the exact kth value."""
    torch.manual_seed(3)
    sae = build_sae(BatchTopKSAEConfig(d_sae=1024, k=2, normalize_activations="none"), d_in=8)
    x = torch.randn(400, 8)
    x[loud_rows] *= 3
    encoded_rows = []
    pre_acts = sae.pre_acts
    sae.pre_acts = lambda rows: encoded_rows.append(len(rows)) or pre_acts(rows)
    sae.calibrate(x, chunk=100)
    everything = pre_acts(x).flatten()
    expected = everything.kthvalue(everything.numel() - 2 * 400 + 1).values.clamp(min=0)
    assert sae.calibrated_threshold.item() == pytest.approx(expected.item())
    retried = sum(encoded_rows) > 400
    assert retried == (loud_rows.start == 0 and loud_rows.stop > 0)


def test_b_dec_init_mean_and_geometric_median():
    pts = torch.tensor([[0.0], [1.0], [10.0]])
    assert geometric_median(pts).item() == pytest.approx(1.0, abs=1e-3)
    square = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]])
    assert torch.allclose(geometric_median(square), torch.zeros(2), atol=1e-4)
    sae = build_sae(StandardSAEConfig(d_sae=4, b_dec_init="mean", normalize_activations="none"), d_in=1)
    sae.fit_to_data(pts, pts)
    assert sae.b_dec.item() == pytest.approx(11 / 3)


def test_init_norm_search_finds_the_scale_with_the_least_mse():
    """One latent, x > 0, b = 0: recon = relu(s x) s = s^2 x, so the MSE is least at s = 1."""
    sae = build_sae(
        StandardSAEConfig(
            d_sae=1, b_dec_init="zeros", normalize_activations="none", decoder_init_norm=0.1, init_norm_search=True
        ),
        d_in=1,
    )
    with torch.no_grad():  # the init's sign is random; a negative latent never fires on x > 0
        sae.W_dec.abs_(), sae.W_enc.abs_()
    x = torch.tensor([[0.5], [1.0], [2.0]])
    sae.fit_to_data(x, x)
    assert sae.W_dec.item() == pytest.approx(1.0, abs=0.03)
    assert sae.W_enc.item() == pytest.approx(sae.W_dec.item())  # still tied
    assert sae.training  # the mode it was in


def test_init_norm_search_never_loses_to_the_default_scale_and_leaves_running_state():
    torch.manual_seed(0)
    x = torch.randn(256, 8) * 3 + 1
    for cfg in (
        StandardSAEConfig(d_sae=32, decoder_init_norm=0.1),
        BatchTopKSAEConfig(d_sae=32, k=4, decoder_init_norm=1.0),
    ):
        plain = build_sae(cfg, d_in=8)
        searched = build_sae(dataclasses.replace(cfg, init_norm_search=True), d_in=8)
        searched.load_state_dict(plain.state_dict())
        plain.fit_to_data(x, x)
        searched.fit_to_data(x, x)
        with torch.no_grad():
            mse = [float(s.eval()(x, x, 0).losses["mse"]) for s in (plain, searched)]
        assert mse[1] <= mse[0], (cfg.architecture, mse)
        if cfg.architecture == "batchtopk":
            # unit decoder rows stay unit; the probes left no running threshold behind
            assert torch.allclose(searched.W_dec.norm(dim=1), torch.ones(32))
            assert int(searched.threshold_updates) == 0


@pytest.mark.parametrize("active, sparse_path", [(2, True), (40, False)])  # 2 or 40 of 64 latents non-zero
def test_decode_of_sparse_codes_takes_the_sparse_product_and_matches_the_dense_one(monkeypatch, active, sparse_path):
    torch.manual_seed(4)
    sae = build_sae(TopKSAEConfig(d_sae=64, k=2, normalize_activations="none"), d_in=8)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.target_scale.fill_(0.5)
    codes = torch.zeros(3, 10, 64)  # [rows, positions, latents], as the spliced CE pass decodes
    codes.scatter_(-1, torch.rand(3, 10, 64).argsort(-1)[..., :active], torch.rand(3, 10, active))
    conversions = []
    to_csr = torch.Tensor.to_sparse_csr
    monkeypatch.setattr(torch.Tensor, "to_sparse_csr", lambda t, *a: conversions.append(t.shape) or to_csr(t, *a))
    with torch.no_grad():
        out = sae.decode(codes)
    expected = (codes @ sae.W_dec + sae.b_dec) / 0.5
    assert out.shape == (3, 10, 8)
    assert torch.allclose(out, expected, atol=1e-5)
    assert bool(conversions) == sparse_path
