"""What a model's `config.json` says about its shape, read before any weight loads.

Loading a model takes seconds to minutes; a hook in a layer the model does not have, a
context longer than its positions, or a `k` larger than the SAE it implies can be told
from the config file alone; the checks here refuse those at once, naming the key.
Only a config file on disk is read (the embedded model once converted, or a local model
directory); for a hub name or a first run the same checks happen after the load instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saesweep.errors import UserError

# config.json keys of the architectures transformers knows, first match wins
N_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
D_MODEL = ("hidden_size", "n_embd", "d_model")
D_MLP = ("intermediate_size", "n_inner", "ffn_dim")
N_CTX = ("max_position_embeddings", "n_positions", "n_ctx")

# Hook names whose activation has the residual width, or the MLP's hidden width.
# TransformerLens hook points end with these; HF module paths (Llama/GPT-2 layouts) too.
RESIDUAL_WIDTH = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_mlp_in",
    "hook_normalized",
    "self_attn",
    "attn",
    "mlp",
    "mlp.down_proj",
    "mlp.c_proj",
)
MLP_WIDTH = ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear", "mlp.act_fn", "mlp.up_proj", "mlp.gate_proj")


@dataclass(frozen=True)
class ModelShape:
    n_layers: int | None
    d_model: int | None
    d_mlp: int | None
    n_ctx: int | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        def first(keys: tuple[str, ...]) -> int | None:
            values = [config[k] for k in keys if isinstance(config.get(k), int) and not isinstance(config[k], bool)]
            return values[0] if values else None

        d_model, d_mlp = first(D_MODEL), first(D_MLP)
        if d_mlp is None and d_model is not None and config.get("model_type") == "gpt2":
            d_mlp = 4 * d_model  # GPT-2's n_inner: null means 4 x n_embd
        return cls(first(N_LAYERS), d_model, d_mlp, first(N_CTX))

    def hook_width(self, hook: str) -> int | None:
        """The width of the activation at `hook`, where its name tells (None: unknown)."""
        name, _, io = hook.partition(":")
        if io == "input" and name.endswith(("mlp.down_proj", "mlp.c_proj")):
            return self.d_mlp  # the down projection reads the MLP's hidden activation
        parts = name.split(".")
        last_two = ".".join(parts[-2:])
        if last_two in MLP_WIDTH:
            return self.d_mlp
        if parts[-1] in RESIDUAL_WIDTH or last_two in RESIDUAL_WIDTH or _is_layer(parts):
            return self.d_model
        return None


def _is_layer(parts: list[str]) -> bool:
    """A whole decoder layer's module path: `model.layers.6`, `transformer.h.6`."""
    return len(parts) >= 2 and parts[-1].isdigit() and parts[-2] in ("layers", "h", "blocks")


def read_shape(path: Path) -> ModelShape | None:
    """The shape a config.json gives; None if it cannot be read (the loader will say why)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return ModelShape.from_config(config) if isinstance(config, dict) else None


def hook_layer(hook_name: str) -> int | None:
    """The layer a hook (or parameter) name lives in: `blocks.N...` or `....layers.N...`."""
    parts = hook_name.split(":")[0].split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("blocks", "layers") and parts[i + 1].isdigit() and (part == "layers" or i == 0):
            return int(parts[i + 1])
    return None


def check_model_against_shape(cfg: Any, shape: ModelShape) -> None:
    """Hooks and context size against the model's shape (cfg: TrainConfig)."""
    hooks = [("model.hook_point", cfg.model.hook_point)]
    if cfg.model.hook_point_out is not None:
        hooks.append(("model.hook_point_out", cfg.model.hook_point_out))
    hooks += [("activations.cache_hooks", h) for h in cfg.activations.cache_hooks]
    for key, hook in hooks:
        layer = hook_layer(hook)
        if layer is not None and shape.n_layers is not None and layer >= shape.n_layers:
            raise UserError(
                f"config key '{key}': {hook} is in layer {layer}, but the model has {shape.n_layers} layers "
                f"(0 to {shape.n_layers - 1})"
            )
    if shape.n_ctx is not None and cfg.dataset.context_size > shape.n_ctx:
        raise UserError(
            f"config key 'dataset.context_size': {cfg.dataset.context_size} exceeds the model's n_ctx {shape.n_ctx}"
        )


def check_sae_against_shape(cfg: Any, shape: ModelShape) -> None:
    """The SAE's k against the width it has on this model's hook (cfg: TrainConfig); one
    member of a group at a time, since each may set its own."""
    d_in = shape.hook_width(cfg.model.hook_point)
    if d_in is None:
        return
    width = cfg.sae.width(d_in)
    for key in ("k", "initial_k"):
        value = getattr(cfg.sae, key, None)
        if value is not None and value > width:
            raise UserError(
                f"config key 'sae.{key}': {value} exceeds the SAE width {width} "
                f"({cfg.model.hook_point} has width {d_in}; set sae.d_sae or sae.expansion_factor)"
            )
