"""Mistakes against the model's shape are refused from its config.json, before weights load."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from saesweep.errors import UserError
from saesweep.lm.shape import ModelShape, check_model_against_shape, check_sae_against_shape, read_shape

LLAMA = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
         "max_position_embeddings": 8192}  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_inner": None, "n_positions": 1024}


def test_the_shape_of_two_config_layouts():
    assert ModelShape.from_config(LLAMA) == ModelShape(n_layers=30, d_model=576, d_mlp=1536, n_ctx=8192)
    assert ModelShape.from_config(GPT2) == ModelShape(n_layers=12, d_model=768, d_mlp=3072, n_ctx=1024)


@pytest.mark.parametrize(
    "hook,width",
    [
        ("blocks.6.hook_resid_post", 576),
        ("blocks.6.hook_resid_pre", 576),
        ("blocks.6.hook_mlp_out", 576),
        ("blocks.6.ln2.hook_normalized", 576),
        ("blocks.6.mlp.hook_post", 1536),
        ("blocks.6.attn.hook_z", None),  # [heads, d_head]: not a width the name tells
        ("model.layers.6", 576),
        ("model.layers.6:input", 576),
        ("model.layers.6.mlp", 576),
        ("model.layers.6.self_attn", 576),
        ("model.layers.6.mlp.down_proj:input", 1536),
        ("model.layers.6.mlp.act_fn", 1536),
        ("model.embed_tokens", None),
    ],
)
def test_hook_widths_from_their_names(hook, width):
    assert ModelShape.from_config(LLAMA).hook_width(hook) == width


def cfg(hook="blocks.6.hook_resid_post", hook_out=None, context=128, k=32, expansion=8, d_sae=None, cache_hooks=()):
    def width(d_in):
        return d_sae if d_sae is not None else expansion * d_in

    return SimpleNamespace(
        model=SimpleNamespace(hook_point=hook, hook_point_out=hook_out),
        dataset=SimpleNamespace(context_size=context),
        activations=SimpleNamespace(cache_hooks=list(cache_hooks)),
        sae=SimpleNamespace(k=k, initial_k=None, width=width),
    )


def test_hooks_and_context_against_the_shape():
    shape = ModelShape.from_config(LLAMA)
    check_model_against_shape(cfg(), shape)
    with pytest.raises(UserError, match=r"'model.hook_point': blocks.30.hook_resid_post is in layer 30, .* 30 layers"):
        check_model_against_shape(cfg(hook="blocks.30.hook_resid_post"), shape)
    with pytest.raises(UserError, match=r"'model.hook_point_out': model.layers.31.mlp is in layer 31"):
        check_model_against_shape(cfg(hook="model.layers.6", hook_out="model.layers.31.mlp"), shape)
    with pytest.raises(UserError, match=r"'activations.cache_hooks'"):
        check_model_against_shape(cfg(cache_hooks=["blocks.40.hook_resid_post"]), shape)
    with pytest.raises(UserError, match=r"'dataset.context_size': 9000 exceeds the model's n_ctx 8192"):
        check_model_against_shape(cfg(context=9000), shape)


def test_k_against_the_width_the_sae_gets_on_this_hook():
    shape = ModelShape.from_config(LLAMA)
    check_sae_against_shape(cfg(k=4608), shape)  # 8 x 576: exactly fits
    with pytest.raises(
        UserError, match=r"'sae.k': 4609 exceeds the SAE width 4608 \(blocks.6.hook_resid_post has width 576"
    ):
        check_sae_against_shape(cfg(k=4609), shape)
    with pytest.raises(UserError, match=r"'sae.k': 1537 exceeds the SAE width 1536"):
        check_sae_against_shape(cfg(hook="blocks.6.mlp.hook_post", k=1537, expansion=1), shape)
    check_sae_against_shape(cfg(hook="blocks.6.attn.hook_z", k=10**6), shape)  # unknown width: checked after the load


def test_an_unreadable_config_file_gives_no_shape(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert read_shape(tmp_path / "config.json") is None
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert read_shape(tmp_path / "config.json").n_layers == 30
