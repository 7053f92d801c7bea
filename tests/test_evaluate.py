"""`python -m saesweep.evaluate`: the SAE directory reader, its errors, and its metrics
against training's eval.json and against SAELens's own evaluation."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from conftest import TINY_RUN, run_cli, run_in_process
from safetensors.torch import load_file, save_file

import saesweep.evaluate
from saesweep.errors import UserError
from saesweep.sae import build_sae
from saesweep.sae.batchtopk import BatchTopKSAEConfig
from saesweep.sae.standard import StandardSAEConfig
from saesweep.sae.topk import TopKSAEConfig
from saesweep.sae_format.read import load_sae_dir
from saesweep.sae_format.write import save_sae

HOOK = "blocks.6.hook_resid_post"
EVAL_ARGS = ["eval.rows=24", "eval.batch_rows=8", "activations.batch_rows=16"]


def lens_sae(arch: str, d_in: int, d_sae: int, weights: dict[str, torch.Tensor] | None = None, seed: int = 0):
    """A SAELens inference SAE of `arch`, with given or random (non-trivial) weights."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 8}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {}),
    }
    sae_cls, cfg_cls, extra = classes[arch]
    cfg = cfg_cls(
        d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=HOOK, model_name="SmolLM2-135M-Instruct.Q4_1"), **extra
    )
    sae = sae_cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if weights is not None and name in weights:
                param.copy_(weights[name])
            elif weights is None:
                # random, but at scales where every code path (gates, thresholds) matters
                param.copy_(0.3 * torch.randn(param.shape, generator=g))
    return sae


# --- the reader ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_reads_sae_lens_saved_dirs_with_sae_lens_encode_and_decode(arch, tmp_path):
    sae = lens_sae(arch, d_in=12, d_sae=40)
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.rand(40) * 0.5)  # positive thresholds, per latent
    sae.save_model(tmp_path / "sae")
    ours = load_sae_dir(tmp_path / "sae")
    assert (ours.architecture, ours.d_in, ours.d_sae, ours.hook_name) == (arch, 12, 40, HOOK)

    x = 2 * torch.randn(200, 12)
    with torch.no_grad():
        want = sae.encode(x)
        got = ours.encode(x)
        assert torch.allclose(got, want, atol=1e-5)
        assert 0 < (got != 0).float().mean() < 1  # some latents off, some on: the activation matters
        assert torch.allclose(ours.decode(got), sae.decode(want), atol=1e-4)


def test_reads_a_sae_lens_transcoder_with_its_output_width(tmp_path):
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    cfg = sae_lens.TranscoderConfig(
        d_in=12,
        d_sae=40,
        d_out=7,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=HOOK, hook_name_out="blocks.6.hook_mlp_out"),
    )
    lens = sae_lens.Transcoder(cfg)
    with torch.no_grad():
        lens.b_enc.copy_(0.3 * torch.randn(40))
        lens.b_dec.copy_(torch.randn(7))
    lens.save_model(tmp_path / "tc")
    saved = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    del saved["apply_b_dec_to_input"]  # a transcoder never subtracts b_dec, said or not
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps(saved))
    ours = load_sae_dir(tmp_path / "tc")
    assert (ours.d_in, ours.d_out, ours.hook_name_out) == (12, 7, "blocks.6.hook_mlp_out")
    x = torch.randn(50, 12)
    with torch.no_grad():
        assert torch.allclose(ours.decode(ours.encode(x)), lens.decode(lens.encode(x)), atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        StandardSAEConfig(d_sae=48, normalize_activations="expected_average_only_in"),
        TopKSAEConfig(d_sae=48, k=6, normalize_activations="expected_average_only_in"),
        BatchTopKSAEConfig(d_sae=48, k=6, normalize_activations="expected_average_only_in"),
    ],
    ids=["standard", "topk", "batchtopk"],
)
def test_reads_our_exports_with_our_modules_encode(cfg, tmp_path):
    torch.manual_seed(0)
    sae = build_sae(cfg, d_in=16)
    x = 30 * torch.randn(512, 16) + 5
    sae.fit_to_data(x, x)
    with torch.no_grad():
        sae.b_enc.add_(0.5 * torch.randn(48))  # so that ReLU and thresholds cut somewhere
    sae.calibrate(x)
    sae.eval()
    save_sae(sae, tmp_path / "sae", {"hook_name": HOOK})
    loaded = load_sae_dir(tmp_path / "sae")
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-4)
        assert torch.allclose(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-3)


def write_sae_dir(path, arch="standard", d_in=8, d_sae=16):
    lens_sae(arch, d_in, d_sae).save_model(path)
    return path


def corrupt(kind: str, sae_dir):
    """Break a good SAE directory in one way; returns the file the error must name."""
    cfg_path, weights_path = sae_dir / "cfg.json", sae_dir / "sae_weights.safetensors"
    cfg = json.loads(cfg_path.read_text())
    if kind == "no_dir":
        return sae_dir.parent / "nowhere"
    if kind == "not_a_dir":
        return cfg_path
    if kind == "no_cfg":
        cfg_path.unlink()
        return cfg_path
    if kind == "bad_json":
        cfg_path.write_text(cfg_path.read_text()[:40])
        return cfg_path
    if kind == "no_d_sae":
        del cfg["d_sae"]
    elif kind == "bad_d_in":
        cfg["d_in"] = "eight"
    elif kind == "unknown_arch":
        cfg["architecture"] = "wavelet"
    if kind in ("no_d_sae", "bad_d_in", "unknown_arch"):
        cfg_path.write_text(json.dumps(cfg))
        return cfg_path
    tensors = load_file(str(weights_path))
    if kind == "no_weights":
        weights_path.unlink()
    elif kind == "truncated":
        weights_path.write_bytes(weights_path.read_bytes()[:200])
    elif kind == "garbage":
        weights_path.write_bytes(struct.pack("<Q", 10**12) + b"not a header")
    elif kind == "missing_tensor":
        del tensors["b_enc"]
        save_file(tensors, str(weights_path))
    elif kind == "wrong_shape":
        tensors["W_dec"] = tensors["W_dec"][:, :5].contiguous()
        save_file(tensors, str(weights_path))
    elif kind == "nan":
        tensors["W_enc"][0, 0] = float("nan")
        save_file(tensors, str(weights_path))
    return weights_path


KINDS = {  # kind -> a phrase the message must contain
    "no_dir": "does not exist",
    "not_a_dir": "not a directory",
    "no_cfg": "missing",
    "bad_json": "not valid JSON",
    "no_d_sae": "'d_sae'",
    "bad_d_in": "'d_in'",
    "unknown_arch": "'wavelet'",
    "no_weights": "missing",
    "truncated": "not a readable safetensors",
    "garbage": "not a readable safetensors",
    "missing_tensor": "'b_enc'",
    "wrong_shape": "'W_dec' has shape",
    "nan": "NaN",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_broken_dirs_give_one_line_errors_naming_the_file(kind, tmp_path):
    path = corrupt(kind, write_sae_dir(tmp_path / "sae"))
    target = path if kind in ("no_dir", "not_a_dir") else tmp_path / "sae"
    with pytest.raises(UserError) as err:
        load_sae_dir(target)
    message = str(err.value)
    assert str(path) in message and KINDS[kind] in message, message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["truncated", "bad_json"])
def test_cli_on_a_broken_dir_exits_with_one_line_no_traceback(kind, tmp_path):
    path = corrupt(kind, write_sae_dir(tmp_path / "sae"))
    code, out = run_in_process(saesweep.evaluate.cli, [str(tmp_path / "sae"), f"hydra.run.dir={tmp_path / 'out'}"])
    assert code == 2, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0], out[-2000:]
    assert "Traceback" not in out


def test_cli_refuses_an_sae_of_another_width_before_the_model_loads(tmp_path, monkeypatch):
    import saesweep.lm.model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    from saesweep.config.schema import ModelConfig

    saesweep.lm.model.embedded_model_dir(ModelConfig().name, None)  # converted: its config.json is on disk
    write_sae_dir(tmp_path / "sae", d_in=32, d_sae=64)
    monkeypatch.setattr(saesweep.lm.model, "load_model", no_loading)
    code, out = run_in_process(
        saesweep.evaluate.cli, [f"sae_path={tmp_path / 'sae'}", *EVAL_ARGS, f"hydra.run.dir={tmp_path / 'out'}"]
    )
    assert code == 2, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "d_in is 32" in errors[0] and "width 576" in errors[0], out[-2000:]
    assert "Traceback" not in out


# --- end to end: a TINY_RUN of training, then evaluate on its SAE -----------------


@pytest.fixture(scope="module")
def trained_and_evaluated(tmp_path_factory):
    work = tmp_path_factory.mktemp("evaluate-e2e")
    run_dir = work / "run"
    proc = run_cli("saesweep.train", "architecture=topk", "sae.k=16", *TINY_RUN, f"hydra.run.dir={run_dir}", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        "saesweep.evaluate",
        str(run_dir / "sae"),
        *EVAL_ARGS,
        "eval.ce_rows=4",
        f"hydra.run.dir={work / 'evaluated'}",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, work / "evaluated"


@pytest.mark.slow
def test_evaluate_reproduces_the_training_runs_eval_json(trained_and_evaluated):
    run_dir, out = trained_and_evaluated
    trained = json.loads((run_dir / "eval.json").read_text())
    evaluated = json.loads((out / "eval.json").read_text())
    # Same held-out rows and hook; the exported weights have the input scaling folded in,
    # so only float rounding may differ.
    for key in (
        "l0",
        "mse",
        "explained_variance",
        "dead_fraction",
        "ce_clean",
        "ce_sae",
        "ce_ablation",
        "ce_loss_score",
    ):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-4, abs=1e-6), key
    assert evaluated["dead_window_tokens"] == trained["dead_window_tokens"]
    assert (evaluated["architecture"], evaluated["hook_point"], evaluated["d_sae"]) == ("topk", HOOK, 1152)


@pytest.mark.slow
def test_evaluate_draws_the_density_histogram(trained_and_evaluated):
    import matplotlib.image

    _, out = trained_and_evaluated
    png = out / "density.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(str(png)).shape
    assert height > 200 and width > 300


@pytest.mark.slow
def test_training_export_writes_sae_lens_sparsity(trained_and_evaluated):
    """sparsity.safetensors holds log10 firing rates over the eval window, under the key
    SAELens reads; its rates sum to L0 and its floor marks exactly the dead latents."""
    from sae_lens import SAE as LensSAE
    from safetensors import safe_open

    run_dir, out = trained_and_evaluated
    result = json.loads((run_dir / "eval.json").read_text())
    with safe_open(str(run_dir / "sae" / "sparsity.safetensors"), framework="pt") as f:  # as sae_lens's hub loader
        sparsity = f.get_tensor("sparsity")
    assert sparsity.shape == (1152,) and sparsity.dtype == torch.float32
    assert float(sparsity.max()) <= 0
    rate = torch.where(sparsity > -10, 10 ** sparsity.double(), 0.0)
    assert float(rate.sum()) == pytest.approx(result["l0"], rel=1e-4)  # sum of per-latent rates = mean active per token
    counts = rate * result["dead_window_tokens"]
    assert torch.allclose(counts, counts.round(), atol=1e-2)  # rates are counts over the window
    assert float((sparsity <= -10).double().mean()) == pytest.approx(result["dead_fraction"])
    # evaluate measures the exported SAE independently and gets the same rates
    assert torch.allclose(load_file(str(out / "sparsity.safetensors"))["sparsity"], sparsity, atol=1e-4)
    LensSAE.load_from_disk(str(run_dir / "sae"))  # the extra file does not trouble its loader


# --- SAELens's own evaluation of SAELens-saved SAEs --------------------------------


class RowsStore:
    """The one method of SAELens's ActivationsStore that its sparsity/variance eval calls."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.at = rows, 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        batch = self.rows[self.at : self.at + n]
        self.at += n
        return batch


def sparse_coding_weights(x: torch.Tensor, arch: str) -> dict[str, torch.Tensor]:
    """An SAE that codes the activations' principal components (both signs) above a
    threshold: a real sparse code, built without training."""
    mean = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    W_dec = torch.cat([vt, -vt])  # [2 d_in, d_in], unit rows
    proj = (x - mean) @ W_dec.T
    t = float(proj.relu().quantile(0.97))
    d_sae = W_dec.shape[0]
    weights = {"W_enc": W_dec.T.contiguous(), "W_dec": W_dec, "b_dec": mean}
    if arch in ("standard", "topk"):
        weights["b_enc"] = torch.full((d_sae,), -t if arch == "standard" else 0.0)
    elif arch == "jumprelu":
        weights.update(b_enc=torch.zeros(d_sae), threshold=torch.full((d_sae,), t))
    else:
        weights.update(b_gate=torch.full((d_sae,), -t), b_mag=torch.zeros(d_sae), r_mag=torch.zeros(d_sae))
    return weights


@pytest.fixture(scope="module")
def held_out(smollm2):
    from saesweep.activations.source import ActivationSource
    from saesweep.config.schema import DatasetConfig
    from saesweep.data.rows import load_token_rows

    token_rows = load_token_rows(DatasetConfig(), smollm2.tokenizer, eval_rows=24, seed=42)
    rows = token_rows.eval_rows
    source = ActivationSource(smollm2, HOOK, None, exclude_bos=True)
    # weights come from other held-out rows than the 24 that are measured
    fit = torch.cat([chunk[0] for chunk in source.batches(rows[24:56], 16)])
    return rows[:24], source, fit, token_rows


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_l0_ev_and_density_match_sae_lens_evals(arch, held_out, smollm2, tmp_path):
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    from saesweep.evaluation.held_out import evaluate

    rows, source, fit, _ = held_out
    sae = lens_sae(arch, fit.shape[1], 2 * fit.shape[1], sparse_coding_weights(fit, arch))
    if arch == "topk":
        sae.cfg.k = 32
        sae.activation_fn.k = 32
    sae.save_model(tmp_path / "sae")

    ours = evaluate(load_sae_dir(tmp_path / "sae"), source, rows, n_rows=24, n_ce_rows=0, batch_rows=8)
    from sae_lens import SAE as LensSAE

    theirs, features = get_sparsity_and_variance_metrics(
        LensSAE.load_from_disk(str(tmp_path / "sae")),
        smollm2,
        RowsStore(rows),
        ActivationScaler(),
        n_batches=3,
        compute_l2_norms=False,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=8,
        model_kwargs={},
        ignore_tokens=[smollm2.tokenizer.bos_token_id],
    )
    assert 1 < ours["l0"] < 200 and 0.2 < ours["explained_variance"] < 0.999  # a real sparse code
    assert ours["l0"] == pytest.approx(theirs["l0"], rel=0.01)
    assert ours["explained_variance"] == pytest.approx(theirs["explained_variance"], rel=0.01)
    density = torch.tensor(features["feature_density"], dtype=torch.float64)
    assert torch.allclose(ours.firing_rate(), density, atol=1e-6)


def train_with_sae_lens(model, token_rows, out_dir) -> None:
    """A few steps of SAELens's own trainer on our training rows; it saves the SAE in out_dir."""
    import itertools
    import signal

    import datasets
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )

    train_rows = torch.stack(list(itertools.islice(token_rows.train_iter(), 160)))
    bos = model.tokenizer.bos_token_id
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=model.cfg.d_model,
            d_sae=2 * model.cfg.d_model,
            l1_coefficient=1.0,
            dtype="float32",
            device="cpu",
            normalize_activations="expected_average_only_in",
        ),
        model_name="SmolLM2-135M-Instruct.Q4_1",
        hook_name=HOOK,
        dataset_path="shakespeare (saesweep rows)",
        streaming=False,
        is_dataset_tokenized=True,
        context_size=train_rows.shape[1],
        n_batches_in_buffer=8,
        training_tokens=8192,
        store_batch_size_prompts=16,
        train_batch_size_tokens=1024,
        n_batches_for_norm_estimate=2,
        exclude_special_tokens=[bos],
        device="cpu",
        dtype="float32",
        lr=4e-3,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        output_path=str(out_dir),
        verbose=False,
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.manual_seed(0)
    try:
        LanguageModelSAETrainingRunner(
            cfg, override_dataset=datasets.Dataset.from_dict({"input_ids": train_rows.tolist()}), override_model=model
        ).run()
    finally:  # SAELens installs its own handlers and leaves them
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_cli_on_a_sae_lens_trained_sae_matches_sae_lens_evals(held_out, smollm2, tmp_path):
    """The acceptance check: `python -m saesweep.evaluate` on an SAE trained and saved by
    SAELens gives SAELens's own L0 and EV (and feature densities) on the same tokens."""
    from sae_lens import SAE as LensSAE
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    rows, _, _, token_rows = held_out
    train_with_sae_lens(smollm2, token_rows, tmp_path / "sae")
    proc = run_cli(
        "saesweep.evaluate",
        str(tmp_path / "sae"),
        *EVAL_ARGS,
        "eval.ce_rows=0",
        f"out_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((tmp_path / "out" / "eval.json").read_text())
    theirs, features = get_sparsity_and_variance_metrics(
        LensSAE.load_from_disk(str(tmp_path / "sae")),
        smollm2,
        RowsStore(rows),
        ActivationScaler(),
        n_batches=3,
        compute_l2_norms=False,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=8,
        model_kwargs={},
        ignore_tokens=[smollm2.tokenizer.bos_token_id],
    )
    bos_inside = int((rows[:, 1:] == smollm2.tokenizer.bos_token_id).sum())
    assert ours["architecture"] == "standard" and ours["dead_window_tokens"] == 24 * 127 - bos_inside
    assert ours["l0"] > 1 and ours["explained_variance"] > 0.1  # it did learn something
    assert ours["l0"] == pytest.approx(theirs["l0"], rel=0.01)
    assert ours["explained_variance"] == pytest.approx(theirs["explained_variance"], rel=0.01)
    density = torch.tensor(features["feature_density"])
    ours_log10 = load_file(str(tmp_path / "out" / "sparsity.safetensors"))["sparsity"]
    assert torch.allclose(ours_log10, torch.log10(density.clamp_min(1e-10)), atol=1e-4)
    assert not math.isnan(ours["mse"]) and "ce_loss_score" not in ours


def test_identity_sae_on_an_attention_hook_recovers_everything(smollm2, tmp_path):
    """A SAELens hook_z SAE that reconstructs exactly (ReLU(x) - ReLU(-x) = x): heads are
    flattened into one vector per token and the splice puts them back, so EV and the CE
    loss score are 1 and spliced CE equals clean CE."""
    from saesweep.activations.source import ActivationSource
    from saesweep.config.schema import DatasetConfig
    from saesweep.data.rows import load_token_rows
    from saesweep.evaluation.held_out import evaluate

    hook = "blocks.0.attn.hook_z"
    d = smollm2.cfg.n_heads * smollm2.cfg.d_head
    eye = torch.eye(d)
    sae = lens_sae(
        "standard",
        d,
        2 * d,
        {
            "W_enc": torch.cat([eye, -eye], 1),
            "b_enc": torch.zeros(2 * d),
            "W_dec": torch.cat([eye, -eye]),
            "b_dec": torch.zeros(d),
        },
    )
    sae.cfg.metadata.hook_name = hook
    sae.cfg.reshape_activations = "hook_z"
    sae.save_model(tmp_path / "sae")
    loaded = load_sae_dir(tmp_path / "sae")
    assert loaded.hook_name == hook

    rows = load_token_rows(DatasetConfig(), smollm2.tokenizer, eval_rows=4, seed=42).eval_rows
    source = ActivationSource(smollm2, hook, None, exclude_bos=True)
    result = evaluate(loaded, source, rows, n_rows=4, n_ce_rows=2, batch_rows=2)
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result["ce_sae"] == pytest.approx(result["ce_clean"], abs=1e-4)
    assert result["ce_ablation"] > result["ce_clean"] + 0.1  # zeroing the heads' outputs does hurt
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)


def test_cli_takes_the_sae_dir_as_first_argument_whatever_its_name(tmp_path):
    """Hydra's override grammar would split or reject these characters; the positional
    form quotes the path, so it reaches the reader intact."""
    sae_dir = tmp_path / "sweep k=16, it's\\"
    path = corrupt("bad_json", write_sae_dir(sae_dir))
    code, out = run_in_process(saesweep.evaluate.cli, [str(sae_dir), f"hydra.run.dir={tmp_path / 'out'}"])
    assert code == 2, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0], out[-2000:]


def test_evaluations_with_a_shared_key_equal_unshared_ones_and_skip_the_sae_independent_passes(tiny_model, tiny_config):
    """Sweep members evaluated in one process share held-out activations and the clean and
    ablated CE passes: each later member runs one LM pass per CE batch, not four."""
    from conftest import train_a_few_steps

    from saesweep.activations.source import ActivationSource
    from saesweep.data.rows import load_token_rows
    from saesweep.evaluation.held_out import evaluate, shared_key
    from saesweep.sae import build_sae
    from saesweep.sae.topk import TopKSAEConfig

    model = tiny_model
    hook = tiny_config.model.hook_point
    rows = load_token_rows(tiny_config.dataset, model.tokenizer, eval_rows=6, seed=42).eval_rows[:6]
    source = ActivationSource(model, hook, None, exclude_bos=True)
    (x,) = next(source.batches(rows, 6))
    saes = []
    for k in (4, 16):
        torch.manual_seed(0)
        sae = build_sae(TopKSAEConfig(d_sae=128, k=k), model.cfg.d_model)
        train_a_few_steps(sae, x)
        saes.append(sae)
    key = shared_key(tiny_config.model, [hook], source.filter, rows, 2)

    passes = {"to_hook": 0, "full": 0}
    to_hooks, loss = model.run_to_hooks, model.loss_with_hooks

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            passes[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    model.run_to_hooks, model.loss_with_hooks = counted("to_hook", to_hooks), counted("full", loss)
    try:
        first = evaluate(saes[0], source, rows, n_rows=6, n_ce_rows=4, batch_rows=2, shared=key)
        assert passes == {"to_hook": 3, "full": 6}  # 3 activation batches; 2 CE batches x 3 passes
        second = evaluate(saes[1], source, rows, n_rows=6, n_ce_rows=4, batch_rows=2, shared=key)
        assert passes == {"to_hook": 3, "full": 8}  # only the spliced pass of each CE batch
    finally:
        model.run_to_hooks, model.loss_with_hooks = to_hooks, loss
    for sae, got in zip(saes, (first, second)):
        alone = evaluate(sae, source, rows, n_rows=6, n_ce_rows=4, batch_rows=2)
        for name in ("explained_variance", "l0", "ce_clean", "ce_sae", "ce_ablation", "ce_loss_score"):
            assert got[name] == pytest.approx(alone[name], rel=1e-9), name
    assert first["ce_sae"] != second["ce_sae"]  # the SAE-dependent pass did run for each
