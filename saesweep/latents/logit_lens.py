"""The tokens a latent's decoder direction promotes and suppresses through the unembedding.

For latent i with decoder row d = W_dec[i] (the exported SAE's, in the units of the
model's activations) this computes its direct effect on the logits,

    effect_i = (c(d) * g) @ W_U

with W_U [d_model, vocab] the unembedding (TransformerLens's `W_U`, or the transpose of
the HF model's output embedding), g the final norm's weight where the model has one
(1 where it has none), and c the final norm's centring: d - mean(d) for a LayerNorm,
d itself for an RMSNorm. The final norm's division by the residual's scale is left
out (it is the same positive number for every token of the vocabulary, so the ranking
does not change), as are the layers between the hook and the unembedding: this is the
direct path only. The largest entries are the promoted tokens, the smallest the
suppressed ones. It applies when the SAE writes into the residual stream's width
(d_out = d_model); for other hooks (e.g. attention heads' z) there is no direct path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Where HF models keep their final norm, on the base model (LlamaModel.norm, GPT2Model.ln_f, ...).
HF_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


@dataclass
class Unembedding:
    W_U: torch.Tensor  # [d_model, vocab]
    norm_weight: torch.Tensor | None  # [d_model]
    centred: bool  # the final norm subtracts the mean (LayerNorm)
    description: str  # what was used, in words, for the page

    @property
    def d_model(self) -> int:
        return int(self.W_U.shape[0])


def unembedding(model: Any) -> Unembedding:
    """The unembedding and final norm of a saesweep LanguageModel, either backend."""
    if hasattr(model, "W_U"):  # TransformerLens
        norm_type = getattr(model.cfg, "normalization_type", None)
        ln = getattr(model, "ln_final", None)
        weight = getattr(ln, "w", None) if ln is not None else None
        centred = norm_type in ("LN", "LNPre")
        what = "TransformerLens W_U" + (f" after ln_final.w ({norm_type})" if weight is not None else "")
        return Unembedding(model.W_U.detach(), _detached(weight), centred, what)
    hf = model.hf
    out = hf.get_output_embeddings()
    if out is None:
        raise ValueError(f"{type(hf).__name__} has no output embedding")
    base = getattr(hf, "base_model", hf)
    norm = next((getattr(base, n) for n in HF_FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
    weight = getattr(norm, "weight", None) if norm is not None else None
    if weight is not None and weight.shape != (out.weight.shape[1],):
        weight = None
    what = f"the HF model's output embedding ({type(out).__name__})"
    if weight is not None:
        what += f" after the final norm's weight ({type(norm).__name__})"
    return Unembedding(out.weight.detach().T, _detached(weight), isinstance(norm, nn.LayerNorm), what)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach() if t is not None else None


def logit_effects(directions: torch.Tensor, unembed: Unembedding) -> torch.Tensor:
    """[n, d_model] directions -> [n, vocab] direct logit effects (see the module docstring)."""
    d = directions.to(unembed.W_U.device, torch.float32)
    if unembed.centred:
        d = d - d.mean(dim=1, keepdim=True)
    if unembed.norm_weight is not None:
        d = d * unembed.norm_weight.float()
    return d @ unembed.W_U.float()


def top_tokens(effects: torch.Tensor, k: int) -> tuple[list[list[tuple[int, float]]], list[list[tuple[int, float]]]]:
    """Per row: the k (token id, effect) pairs with the largest effect, largest first, and the
    k with the smallest, smallest first."""
    k = min(k, effects.shape[1])
    top = effects.topk(k, dim=1)
    bottom = effects.topk(k, dim=1, largest=False)

    def pairs(result: Any) -> list[list[tuple[int, float]]]:
        return [
            [(int(i), float(v)) for i, v in zip(ids, vals)]
            for ids, vals in zip(result.indices.tolist(), result.values.tolist())
        ]

    return pairs(top), pairs(bottom)
