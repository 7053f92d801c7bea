"""Model loading: the embedded model matches HF, and the hub code path works on local files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, run_cli


def test_embedded_model_log_probs_match_hf(smollm2):
    from transformers import AutoModelForCausalLM

    from saesweep.lm.model import embedded_model_dir

    hf = AutoModelForCausalLM.from_pretrained(embedded_model_dir("SmolLM2-135M-Instruct.Q4_1", None))
    ids = smollm2.tokenizer("Now is the winter of our discontent made glorious summer", return_tensors="pt").input_ids
    ids = torch.cat([torch.tensor([[smollm2.tokenizer.bos_token_id]]), ids], dim=1)
    with torch.no_grad():
        want = hf(ids).logits.log_softmax(-1)
        got = smollm2(ids).log_softmax(-1)
        # the hook activation is the HF hidden state after block 6
        _, cache = smollm2.run_with_cache(ids, names_filter="blocks.6.hook_resid_post", stop_at_layer=7)
        hidden = hf(ids, output_hidden_states=True).hidden_states[7]
    assert (got - want).abs().max().item() < 5e-4
    assert torch.allclose(cache["blocks.6.hook_resid_post"], hidden, rtol=1e-4, atol=2e-3)


def test_weights_stored_as_the_forward_reads_them_skip_its_copies_and_change_no_bit(smollm2):
    """TransformerLens copies W_in.T etc. to contiguous memory at every forward unless
    they are stored that way (saesweep.lm.tl_backend.store_weights_as_read)."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    plain = copy.deepcopy(smollm2)
    with torch.no_grad():
        for p in plain.parameters():
            p.data = p.data.contiguous()  # TransformerLens's own layout
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    # each weight's shape, reversed, and an attention weight's [(head d_head), d_model]
    weight_shapes = {
        s
        for p in smollm2.parameters()
        if p.dim() >= 2
        for s in (tuple(p.shape), tuple(p.shape)[::-1], (p.shape[0] * p.shape[-1], p.shape[1]))
    }

    def weight_copies(model) -> tuple[torch.Tensor, int]:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            logits = model(ids)
        copies = [
            e
            for e in prof.events()
            if e.name == "aten::copy_" and e.input_shapes and tuple(e.input_shapes[0]) in weight_shapes
        ]
        return logits, len(copies)

    want, plain_copies = weight_copies(plain)
    got, copies = weight_copies(smollm2)
    assert plain_copies >= 3 * smollm2.cfg.n_layers and copies == 0  # MLP, attention and W_U copies gone
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(smollm2.parameters(), plain.parameters()))


def test_hook_point_typo_suggests_close_names(smollm2):
    from saesweep.errors import UserError
    from saesweep.lm.model import check_hook

    with pytest.raises(UserError, match="blocks.6.hook_resid_post"):
        check_hook(smollm2, "blocks.6.hook_resid_pots", "model.hook_point")


@pytest.mark.slow
@pytest.mark.parametrize("streaming", ["true", "false"])
def test_hub_code_path_on_local_model_and_dataset(tiny_lm, tmp_path, streaming):
    proc = run_cli(
        "saesweep.train",
        *tiny_lm,
        f"dataset.streaming={streaming}",
        *TINY_RUN,
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["metadata"]["context_size"] == 64
    assert result["tokens_trained"] == 8192 and result["ce_clean"] > 0
