"""model.backend=hf: the Hugging Face model itself, hooked by module path, against TransformerLens.

The embedded SmolLM2 runs through both backends; activations, CE losses and a trained
SAE must agree. Activations are compared where the two compute the same thing in a
different order of float32 operations (HF's SDPA attention vs TransformerLens's einsums).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, run_cli, train_a_few_steps

from saesweep.activations.source import ActivationSource
from saesweep.config.schema import DatasetConfig, ModelConfig
from saesweep.errors import UserError
from saesweep.lm.model import check_hook, load_model, loader_kwargs
from saesweep.lm.shape import hook_layer

# HF module path -> the TransformerLens hook that holds the same activation
SAME = {
    "model.layers.6": "blocks.6.hook_resid_post",
    "model.layers.6:input": "blocks.6.hook_resid_pre",
    "model.layers.6.self_attn": "blocks.6.hook_attn_out",
    "model.layers.6.mlp": "blocks.6.hook_mlp_out",
}


@pytest.fixture(scope="module")
def smollm2_hf():
    return load_model(ModelConfig(backend="hf", hook_point="model.layers.6"), torch.device("cpu"), None)


@pytest.fixture(scope="module")
def rows(smollm2):
    from saesweep.data.rows import load_token_rows

    return load_token_rows(DatasetConfig(), smollm2.tokenizer, eval_rows=24, seed=42).eval_rows[:4]


def test_both_backends_give_the_same_activations(smollm2, smollm2_hf, rows):
    hf = smollm2_hf.run_to_hooks(rows, [*SAME, "model.layers.6.mlp:input"])
    tl = smollm2.run_to_hooks(rows, [*SAME.values(), "blocks.6.ln2.hook_normalized"])
    for name, a, b in zip(SAME, hf, tl):
        assert a.shape == b.shape == (4, 128, 576), name
        # The residual stream has massive activations (|x| ~ 500-800 in dim 507 at BOS and
        # at a few other positions), where 1e-4 is below float32's resolution. Measured on
        # these rows: max |diff| 2.4e-4 (4 ulp at 518) in the residual stream, 1.9e-5 in
        # the attention and MLP outputs; per token, |diff| / |x| <= 5e-6 everywhere.
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), (name, (a - b).abs().max().item())
        assert ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item() < 2e-5, name
    # The MLP's input is the RMS-normalised stream times the norm's weight; TransformerLens
    # hooks it before the weight (ln2.hook_normalized).
    assert torch.allclose(hf[-1], tl[-1] * smollm2.blocks[6].ln2.w.detach(), rtol=1e-4, atol=1e-4)
    # Through the activation source, BOS dropped, as training and the cache see them.
    (chunk,) = ActivationSource(smollm2_hf, "model.layers.6", None, exclude_bos=True).chunk(rows)
    assert torch.equal(chunk, hf[0][rows != smollm2.tokenizer.bos_token_id])
    assert chunk.shape == (4 * 127, 576)


def test_the_hf_pass_stops_after_the_last_hook(smollm2_hf, rows):
    hf = smollm2_hf.hf
    calls: dict[str, int] = {}
    watched = {f"layer{i}": layer for i, layer in enumerate(hf.model.layers)}
    watched.update(norm=hf.model.norm, lm_head=hf.lm_head, mlp7=hf.model.layers[7].mlp)

    def counter(name):
        def count(module, args):
            calls[name] = calls.get(name, 0) + 1

        return count

    handles = [m.register_forward_pre_hook(counter(n)) for n, m in watched.items()]
    try:
        x, target = ActivationSource(smollm2_hf, "model.layers.3", "model.layers.6.mlp", True).chunk(rows)
    finally:
        for h in handles:
            h.remove()
    assert calls == {f"layer{i}": 1 for i in range(7)}  # 7..29, the final norm and the unembedding never ran
    assert x.shape == target.shape == (4 * 127, 576)
    # The stop unwound through the hooks: none is left behind, and a full pass is whole again.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())
    short = rows[:2, :32]
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(
            hf(short).logits[:, :-1].flatten(0, 1), short[:, 1:].flatten(), reduction="none"
        ).view(2, 31)
    assert torch.allclose(smollm2_hf.loss_with_hooks(short, []), want, atol=1e-5)


@pytest.mark.parametrize(
    "hf_hooks,tl_hooks",
    [
        (("model.layers.6", None), ("blocks.6.hook_resid_post", None)),
        (("model.layers.6:input", "model.layers.6.mlp"), ("blocks.6.hook_resid_pre", "blocks.6.hook_mlp_out")),
    ],
    ids=["sae", "transcoder"],
)
def test_ce_loss_score_is_the_same_through_both_backends(smollm2, smollm2_hf, rows, hf_hooks, tl_hooks):
    from saesweep.evaluation.held_out import ce_metrics
    from saesweep.sae import build_sae
    from saesweep.sae.topk import TopKSAEConfig

    tl_source = ActivationSource(smollm2, *tl_hooks, exclude_bos=True)
    hf_source = ActivationSource(smollm2_hf, *hf_hooks, exclude_bos=True)
    torch.manual_seed(0)
    x, *target = tl_source.chunk(rows[:2, :32])
    transcoder = tl_hooks[1] is not None
    sae = build_sae(TopKSAEConfig(d_sae=256, k=16), 576, 576, transcoder=transcoder)
    train_a_few_steps(sae, x, target[0] if target else None, steps=20)
    held_out = rows[2:, :24]  # six full passes through the whole model: keep them short
    tl = ce_metrics(sae, tl_source, held_out, batch_rows=2)
    hf = ce_metrics(sae, hf_source, held_out, batch_rows=2)
    assert tl["ce_tokens"] == hf["ce_tokens"] == 2 * 23
    assert hf["ce_clean"] < hf["ce_sae"] and hf["ce_clean"] < hf["ce_ablation"]  # both splices took effect
    for key in ("ce_clean", "ce_sae", "ce_ablation"):
        assert hf[key] == pytest.approx(tl[key], abs=1e-4), key
    assert hf["ce_loss_score"] == pytest.approx(tl["ce_loss_score"], abs=1e-4)


def test_module_path_typo_suggests_close_paths(smollm2_hf):
    with pytest.raises(UserError, match=r"config key 'model.hook_point': .*did you mean model\.layers\.6\.mlp"):
        check_hook(smollm2_hf, "model.layers.6.mpl", "model.hook_point")
    with pytest.raises(UserError, match=r"e\.g\. model\.layers\.15 \(model\.backend=hf takes module paths\)"):
        check_hook(smollm2_hf, "blocks.6.hook_resid_post", "model.hook_point")
    check_hook(smollm2_hf, "model.layers.6.mlp:input", "model.hook_point")  # inputs are hooks too
    with pytest.raises(UserError):  # a container is iterated, never called: its hook would never fire
        check_hook(smollm2_hf, "model.layers", "model.hook_point")


def test_hook_layer_reads_both_spellings(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from saesweep.lm.hf_backend import HFLanguageModel

    assert hook_layer("blocks.12.hook_resid_post") == 12
    assert hook_layer("model.layers.6.mlp:input") == 6
    assert hook_layer("hook_embed") is None and hook_layer("model.norm") is None
    # Other HF families name the layer list otherwise; the model finds it (GPT-2: transformer.h).
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=32, vocab_size=50))
    model = HFLanguageModel(gpt2.eval(), tokenizer=None)
    assert model.hook_layer("transformer.h.2.mlp") == 2 and model.hook_layer("transformer.ln_f") is None
    assert model.cfg.n_ctx == 32 and model.example_hook().startswith("transformer.h.1 ")
    tokens = torch.randint(0, 50, (2, 8))
    (resid,) = model.run_to_hooks(tokens, ["transformer.h.1"])
    with torch.no_grad():
        assert torch.allclose(resid, gpt2(tokens, output_hidden_states=True).hidden_states[2], atol=1e-6)


def test_from_pretrained_kwargs_reach_the_loader_of_both_backends():
    assert loader_kwargs(ModelConfig(from_pretrained_kwargs={"dtype": "bfloat16", "revision": "main"})) == (
        torch.bfloat16,
        {"revision": "main"},
    )
    assert loader_kwargs(ModelConfig(dtype="float16", from_pretrained_kwargs={"torch_dtype": "torch.float32"})) == (
        torch.float32,
        {},
    )
    with pytest.raises(UserError, match="config key 'model.from_pretrained_kwargs.dtype': 'float8'; valid: float32"):
        loader_kwargs(ModelConfig(from_pretrained_kwargs={"dtype": "float8"}))

    cpu = torch.device("cpu")
    hf = load_model(
        ModelConfig(backend="hf", from_pretrained_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"}),
        cpu,
        None,
    )
    assert hf.cfg.dtype == torch.bfloat16 and next(hf.hf.parameters()).dtype == torch.bfloat16
    assert hf.hf.config._attn_implementation == "eager"
    for backend in ("hf", "transformer_lens"):  # the loader itself refuses an unknown keyword
        with pytest.raises(
            UserError,
            match=r"config key 'model.from_pretrained_kwargs': the loader refused them: "
            r".*unexpected keyword argument 'no_such_kwarg'",
        ):
            load_model(ModelConfig(backend=backend, from_pretrained_kwargs={"no_such_kwarg": 1}), cpu, None)


def test_backend_and_its_weights_enter_the_cache_key(smollm2, smollm2_hf, rows):
    from saesweep.activations.cache import activation_spec, cache_key
    from saesweep.config.schema import TrainConfig

    cfg = TrainConfig()
    base = cache_key(activation_spec(cfg, smollm2, rows, ["blocks.6.hook_resid_post"]))
    cfg.model.backend = "hf"
    assert cache_key(activation_spec(cfg, smollm2, rows, ["blocks.6.hook_resid_post"])) != base
    cfg.model.hook_point = "model.layers.6"
    hooks = ["model.layers.6"]
    key = cache_key(activation_spec(cfg, smollm2_hf, rows, hooks))
    assert key == cache_key(activation_spec(cfg, smollm2_hf, rows, hooks))  # stable
    # a weight up to the hook's layer matters, one after it or the unembedding cannot
    params = dict(smollm2_hf.hf.named_parameters())
    for name, expect_change in (
        ("model.layers.6.mlp.down_proj.weight", True),
        ("model.layers.7.mlp.down_proj.weight", False),
        ("model.embed_tokens.weight", True),
    ):
        with torch.no_grad():
            params[name][0, 0] += 1.0
            try:
                changed = cache_key(activation_spec(cfg, smollm2_hf, rows, hooks)) != key
            finally:
                params[name][0, 0] -= 1.0
        assert changed == expect_change, name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run (same seed) through both backends, at the same activation."""
    out = {}
    for backend, hook in (("hf", "model.layers.6"), ("transformer_lens", "blocks.6.hook_resid_post")):
        run_dir = tmp_path_factory.mktemp(f"run-{backend}")
        proc = run_cli(
            "saesweep.train",
            *TINY_RUN,
            "architecture=topk",
            "sae.k=16",
            f"model.backend={backend}",
            f"model.hook_point={hook}",
            f"hydra.run.dir={run_dir}",
            cwd=run_dir,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[backend] = run_dir
    return out


@pytest.mark.slow
def test_a_cli_run_on_the_hf_backend_trains_the_sae_transformer_lens_does(runs):
    from conftest import weights

    hf, tl = (json.loads((runs[b] / "eval.json").read_text()) for b in ("hf", "transformer_lens"))
    cfg = json.loads((runs["hf"] / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "model.layers.6" and cfg["d_in"] == 576
    assert cfg["metadata"]["model_class_name"] == "AutoModelForCausalLM"
    assert (
        json.loads((runs["transformer_lens"] / "sae" / "cfg.json").read_text())["metadata"]["model_class_name"]
        == "HookedTransformer"
    )
    assert hf["tokens_trained"] == tl["tokens_trained"] == 8192
    for key in ("explained_variance", "ce_loss_score", "ce_clean", "ce_sae", "ce_ablation", "l0", "dead_fraction"):
        assert hf[key] == pytest.approx(tl[key], rel=1e-3, abs=1e-3), key
    w_hf, w_tl = weights(runs["hf"]), weights(runs["transformer_lens"])
    assert (w_hf["W_dec"] - w_tl["W_dec"]).abs().max().item() < 1e-2


@pytest.mark.slow
def test_evaluate_runs_an_hf_trained_sae_on_the_hf_backend_without_being_told(runs, tmp_path):
    """cfg.json's model_class_name picks the backend its hook name belongs to: the default
    model group (TransformerLens) would not know the hook `model.layers.6`."""
    out = tmp_path / "eval"
    proc = run_cli(
        "saesweep.evaluate",
        str(runs["hf"] / "sae"),
        "eval.rows=24",
        "eval.ce_rows=4",
        "eval.batch_rows=8",
        f"out_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating with model.backend=hf" in proc.stdout + proc.stderr
    got, trained = (json.loads((d / "eval.json").read_text()) for d in (out, runs["hf"]))
    assert got["explained_variance"] == pytest.approx(trained["explained_variance"], abs=1e-4)
