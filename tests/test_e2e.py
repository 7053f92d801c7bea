"""The CLI end to end on the embedded model and corpus, a few thousand tokens per run, for
the default architecture. Every architecture's run, export and SAELens reload is in
test_train_tiny.py (tiny model) and test_export.py (the encode and decode maths)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, run_cli, sae_lens_l0_and_ev

pytestmark = pytest.mark.slow  # end-to-end CLI runs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run-batchtopk")
    proc = run_cli(
        "saesweep.train", "architecture=batchtopk", *TINY_RUN, "sae.k=16", f"hydra.run.dir={run_dir}", cwd=run_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_dir_has_the_contract_files(trained_run):
    run_dir = trained_run
    for name in (".hydra/config.yaml", "metrics.jsonl", "eval.json", "sae/cfg.json", "sae/sae_weights.safetensors"):
        assert (run_dir / name).exists(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    result = json.loads((run_dir / "eval.json").read_text())
    for key in (
        "l0",
        "mse",
        "explained_variance",
        "dead_fraction",
        "ce_loss_score",
        "ce_clean",
        "ce_sae",
        "ce_ablation",
        "tokens_trained",
        "tokens_per_second",
    ):
        assert key in result, key
    assert result["tokens_trained"] == 8192
    # 8 steps are enough to beat predicting the mean, and the splice must beat zero-ablation
    assert result["explained_variance"] > 0.2
    assert result["ce_sae"] < result["ce_ablation"]
    assert result["ce_clean"] < result["ce_ablation"]


def test_sae_lens_loads_it_and_computes_the_same(trained_run):
    """sae_lens.SAE.load_from_disk gives our encode/decode, and eval.json's L0 and EV."""
    from sae_lens import SAE as LensSAE
    from safetensors.torch import load_file

    run_dir = trained_run
    lens = LensSAE.load_from_disk(str(run_dir / "sae"))
    cfg = json.loads((run_dir / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # BatchTopK exports as JumpReLU
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"

    # Random inputs at the scale of real activations (norm ~100).
    torch.manual_seed(0)
    x = 4 * torch.randn(64, lens.cfg.d_in)
    weights = load_file(str(run_dir / "sae" / "sae_weights.safetensors"))
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    feats = lens.encode(x)
    want = pre * (pre > weights["threshold"])
    assert torch.allclose(feats, want, atol=1e-5)
    assert torch.allclose(lens.decode(feats), want @ weights["W_dec"] + weights["b_dec"], atol=1e-4)


def test_sae_lens_gives_eval_json_l0_and_ev(trained_run, smollm2):
    from saesweep.config.schema import DatasetConfig
    from saesweep.data.rows import load_token_rows

    run_dir = trained_run
    rows = load_token_rows(DatasetConfig(), smollm2.tokenizer, eval_rows=24, seed=42).eval_rows
    got = sae_lens_l0_and_ev(run_dir / "sae", smollm2, "blocks.6.hook_resid_post", rows[:24])
    want = json.loads((run_dir / "eval.json").read_text())
    assert got["l0"] == pytest.approx(want["l0"], rel=1e-4)
    assert got["explained_variance"] == pytest.approx(want["explained_variance"], abs=1e-4)


def test_batchtopk_exported_as_jumprelu_keeps_its_l0_on_held_out_tokens(trained_run):
    """The exported JumpReLU's threshold, calibrated on training activations, gives about k
    active latents per held-out token too (within 10 %), as the trained BatchTopK does."""
    run_dir = trained_run
    assert json.loads((run_dir / "sae" / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert json.loads((run_dir / "eval.json").read_text())["l0"] == pytest.approx(16, rel=0.10)


def test_bf16_autocast_and_compile_train_to_the_fp32_result(trained_run, tmp_path):
    """training.autocast=bf16 (LM and SAE forward) with training.compile=true: the same
    BatchTopK run as the fp32 fixture ends within a small margin of its EV and L0."""
    fp32_dir = trained_run
    proc = run_cli(
        "saesweep.train",
        "architecture=batchtopk",
        *TINY_RUN,
        "sae.k=16",
        "training.autocast=bf16",
        "training.compile=true",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp32, bf16 = (json.loads((d / "eval.json").read_text()) for d in (fp32_dir, tmp_path))
    assert bf16["explained_variance"] == pytest.approx(fp32["explained_variance"], abs=0.03)
    assert bf16["l0"] == pytest.approx(fp32["l0"], rel=0.1)
