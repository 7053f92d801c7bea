"""The TransformerLens backend: a HookedTransformer with saesweep's LanguageModel methods.

Weights are loaded without folding or centering, so hook activations equal the HF
model's hidden states. A local HF directory (the embedded model's conversion, or any
`save_pretrained` checkpoint) goes through TransformerLens's own weight converters;
a name goes to TransformerLens's hub loader (gpt2, pythia, ...).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from saesweep.errors import UserError
from saesweep.lm.model import HookFn, tokenizer_kwargs
from saesweep.lm.shape import hook_layer


class HookedLM(HookedTransformer):
    """A HookedTransformer (everything TransformerLens offers still works) that is also a LanguageModel."""

    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def hook_layer(self, name: str) -> int | None:
        return hook_layer(name)

    def example_hook(self) -> str:
        return f"blocks.{self.cfg.n_layers // 2}.hook_resid_post"

    def run_to_hooks(self, tokens: torch.Tensor, hooks: list[str]) -> list[torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor, hook: Any) -> None:
            captured[hook.name] = act

        layers = [hook_layer(h) for h in hooks]
        with torch.inference_mode():
            self.run_with_hooks(
                tokens.to(self.cfg.device),
                fwd_hooks=[(h, grab) for h in dict.fromkeys(hooks)],
                stop_at_layer=None if None in layers else max(layers) + 1,
                return_type=None,
            )
        return [captured[h] for h in hooks]

    def loss_with_hooks(self, tokens: torch.Tensor, hooks: list[tuple[str, HookFn]]) -> torch.Tensor:
        fwd = [(name, lambda act, hook, fn=fn: fn(act)) for name, fn in hooks]
        with torch.inference_mode():
            return self.run_with_hooks(
                tokens.to(self.cfg.device), return_type="loss", loss_per_token=True, fwd_hooks=fwd
            )


def load(where: str | Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any]) -> HookedLM:
    """From a local HF directory (Path) or a TransformerLens/hub name (str)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(where, Path):
            model = _from_local_dir(where, device, dtype, kwargs)
        else:
            model = HookedLM.from_pretrained_no_processing(where, device=str(device), dtype=dtype, **kwargs)
    store_weights_as_read(model)
    return model


# TransformerLens keeps W_in as [d_model, d_mlp], W_Q as [head, d_model, d_head], ...,
# and each forward hands F.linear a contiguous copy of its [out, in] rearrangement: a copy
# of every weight in every pass, and of the whole unembedding in every full pass. Each weight is stored instead as a strided view of
# that [out, in] layout (same shape, same values), so the copies are no-ops and the
# products see the very same operands. name -> the permutation that gives [out, ...in].
READ_LAYOUT = {
    "W_in": (1, 0),
    "W_gate": (1, 0),
    "W_out": (1, 0),
    "W_U": (1, 0),
    "W_Q": (0, 2, 1),
    "W_K": (0, 2, 1),
    "W_V": (0, 2, 1),
    "_W_K": (0, 2, 1),
    "_W_V": (0, 2, 1),
    "W_O": (2, 0, 1),
}


def store_weights_as_read(model: HookedTransformer) -> None:
    if model.cfg.use_split_qkv_input or model.cfg.use_attn_in:  # attention reads W_Q etc. by einsum
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            perm = READ_LAYOUT.get(name.rsplit(".", 1)[-1])
            if perm is not None and param.dim() == len(perm):
                back = sorted(range(len(perm)), key=perm.__getitem__)
                param.data = param.data.permute(*perm).contiguous().permute(*back)


def _from_local_dir(path: Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any]) -> HookedLM:
    """TransformerLens's from_pretrained, minus the hub-name lookup it insists on."""
    import transformer_lens.loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise UserError(f"config key 'model.name': {path} has no config.json (not a HF model directory)")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs(kwargs))
    tl_cfg = loading.get_pretrained_model_config(
        str(path), hf_cfg=hf_model.config.to_dict(), fold_ln=False, device=str(device), dtype=dtype
    )
    state_dict = loading.get_pretrained_state_dict(str(path), tl_cfg, hf_model, dtype=dtype)
    model = HookedLM(tl_cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device)
