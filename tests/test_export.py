"""Our SAE module and SAELens's loader agree on the exported files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_a_few_steps

from saesweep.sae import build_sae
from saesweep.sae.batchtopk import BatchTopKSAEConfig
from saesweep.sae.standard import StandardSAEConfig
from saesweep.sae.topk import TopKSAEConfig
from saesweep.sae_format.write import save_sae

NORM = "expected_average_only_in"


@pytest.mark.parametrize(
    "cfg",
    [
        StandardSAEConfig(d_sae=48, l1_coefficient=0.1, normalize_activations=NORM),
        TopKSAEConfig(d_sae=48, k=6, normalize_activations=NORM),
        BatchTopKSAEConfig(d_sae=48, k=6, normalize_activations=NORM),
    ],
    ids=["standard", "topk", "batchtopk"],
)
def test_sae_lens_load_from_disk_encodes_and_decodes_like_our_module(cfg, tmp_path):
    from sae_lens import SAE as LensSAE

    torch.manual_seed(0)
    sae = build_sae(cfg, d_in=16)
    x = 30 * torch.randn(512, 16) + 5  # raw activations far from unit scale, so folding matters
    train_a_few_steps(sae, x)

    save_sae(sae, tmp_path / "sae", {"model_name": "test", "hook_name": "blocks.0.hook_resid_post"})
    lens = LensSAE.load_from_disk(str(tmp_path / "sae"))
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved["normalize_activations"] == "none" and saved["d_sae"] == 48

    probe = 30 * torch.randn(64, 16) + 5
    with torch.no_grad():
        ours = sae.encode(probe)
        theirs = lens.encode(probe)
        assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)
        assert torch.allclose(lens.decode(theirs), sae.decode(ours), rtol=1e-5, atol=1e-4)
    assert (ours != 0).any()


def test_save_replaces_an_existing_export_whole(tmp_path):
    sae = build_sae(TopKSAEConfig(d_sae=8, k=2), d_in=4)
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "stale.txt").write_text("from an older export")
    save_sae(sae, tmp_path / "sae", {})
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no staging or backup dirs left behind
