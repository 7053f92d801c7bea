"""Transcoders: read one hook, reconstruct another; exported so SAELens loads them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, run_cli, train_a_few_steps

from saesweep.sae import build_sae
from saesweep.sae.batchtopk import BatchTopKSAEConfig
from saesweep.sae.gated import GatedSAEConfig
from saesweep.sae.standard import StandardSAEConfig
from saesweep.sae.topk import TopKSAEConfig
from saesweep.sae_format.write import save_sae

NORM = "expected_average_only_in"


@pytest.mark.parametrize(
    "cfg,d_out,lens_arch",
    [
        (StandardSAEConfig(d_sae=48, normalize_activations=NORM), 24, "transcoder"),
        (BatchTopKSAEConfig(d_sae=48, k=6, normalize_activations=NORM), 24, "jumprelu_transcoder"),
        (TopKSAEConfig(d_sae=48, k=6, normalize_activations=NORM), 16, "topk"),
        (GatedSAEConfig(d_sae=48, normalize_activations=NORM), 16, "gated"),
    ],
    ids=["standard", "batchtopk", "topk-same-width", "gated-same-width"],
)
def test_transcoder_export_loads_in_sae_lens_and_matches(cfg, d_out, lens_arch, tmp_path):
    from sae_lens import SAE as LensSAE

    torch.manual_seed(0)
    sae = build_sae(cfg, d_in=16, d_out=d_out, transcoder=True)
    assert not sae.cfg.apply_b_dec_to_input and cfg.apply_b_dec_to_input  # the run's config is untouched
    x, y = 30 * torch.randn(512, 16) + 5, 3 * torch.randn(512, d_out) - 1
    train_a_few_steps(sae, x, y)
    save_sae(sae, tmp_path / "sae", {"hook_name": "in", "hook_name_out": "out"})
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved["architecture"] == lens_arch and saved["apply_b_dec_to_input"] is False
    assert saved.get("d_out", 16) == d_out

    lens = LensSAE.load_from_disk(str(tmp_path / "sae"))
    with torch.no_grad():
        ours = sae.encode(x)
        torch.testing.assert_close(lens.encode(x), ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lens.decode(ours), sae.decode(ours), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_transcoder_trains_end_to_end_from_mlp_in_to_mlp_out(tmp_path):
    proc = run_cli(
        "saesweep.train",
        *TINY_RUN,
        "model.hook_point=blocks.6.ln2.hook_normalized",
        "model.hook_point_out=blocks.6.hook_mlp_out",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < result["explained_variance"] < 1 and 0 < result["ce_loss_score"] <= 1.01
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu_transcoder" and saved["d_out"] == 576
    assert saved["metadata"]["hook_name"] == "blocks.6.ln2.hook_normalized"
    assert saved["metadata"]["hook_name_out"] == "blocks.6.hook_mlp_out"

    from sae_lens import SAE as LensSAE

    assert type(LensSAE.load_from_disk(str(tmp_path / "sae"))).__name__ == "JumpReLUTranscoder"
