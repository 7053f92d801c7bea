"""The Hugging Face backend: AutoModelForCausalLM itself, read and edited by forward hooks.

Hook names are module paths, as `named_modules()` spells them (SAELens's
`model_class_name` option does the same):
- `model.layers.6`: decoder layer 6's output, the residual stream after it
  (TransformerLens's `blocks.6.hook_resid_post`);
- `model.layers.6.mlp`, `model.layers.6.self_attn`: that sublayer's output
  (`blocks.6.hook_mlp_out`, `blocks.6.hook_attn_out`);
- `PATH:input`: a module's first input, e.g. `model.layers.6.mlp:input` is the
  normalised MLP input (`blocks.6.ln2.hook_normalized`), for transcoders.
A module that returns a tuple is read, and replaced, at element 0.

An activation pass ends as soon as every requested hook has fired: the last one
raises a private exception that unwinds the forward, so the layers after it, the
final norm and the unembedding never run (they dominate a pass to a middle layer).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from saesweep.errors import UserError
from saesweep.lm.model import HookFn, tokenizer_kwargs

INPUT_SUFFIX = ":input"
# Config entries that say where or with what a model was saved, not what it computes.
CONFIG_NOT_ARCHITECTURE = ("_name_or_path", "transformers_version", "_commit_hash")


class _StopForward(Exception):
    """Raised by the last hook an activation pass needs; caught by run_to_hooks."""


@dataclass
class HFModelInfo:
    """The `cfg` a LanguageModel exposes, read from the HF model and its config."""

    device: str
    n_ctx: int
    dtype: torch.dtype
    n_layers: int
    hf_config: Any

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.hf_config.to_dict().items() if k not in CONFIG_NOT_ARCHITECTURE}


class HFLanguageModel:
    """An AutoModelForCausalLM behind the LanguageModel interface of saesweep.lm.model."""

    def __init__(self, hf: nn.Module, tokenizer: Any):
        self.hf = hf
        self.tokenizer = tokenizer
        self.modules = dict(hf.named_modules())
        self.layers_path = _layers_path(hf)
        param = next(hf.parameters())
        config = hf.config
        self.cfg = HFModelInfo(
            device=str(param.device),
            n_ctx=int(getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length),
            dtype=param.dtype,
            n_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
            hf_config=config,
        )

    def eval(self) -> "HFLanguageModel":
        self.hf.eval()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.hf.state_dict()

    def hook_names(self) -> list[str]:
        # Containers (the ModuleList of layers) are iterated, never called: their hooks never fire.
        called = [p for p, m in self.modules.items() if p and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
        return [name for path in called for name in (path, path + INPUT_SUFFIX)]

    def hook_layer(self, name: str) -> int | None:
        prefix = f"{self.layers_path}."
        if self.layers_path and name.startswith(prefix):
            index = name[len(prefix) :].split(".")[0].split(":")[0]
            if index.isdigit():
                return int(index)
        return None

    def example_hook(self) -> str:
        layer = f"{self.layers_path}.{self.cfg.n_layers // 2}" if self.layers_path else "model.layers.0"
        return f"{layer} (model.backend=hf takes module paths)"

    def run_to_hooks(self, tokens: torch.Tensor, hooks: list[str]) -> list[torch.Tensor]:
        wanted = list(dict.fromkeys(hooks))
        captured: dict[str, torch.Tensor] = {}

        def reader(name: str) -> HookFn:
            def read(act: torch.Tensor) -> None:
                captured[name] = act
                if len(captured) == len(wanted):
                    raise _StopForward

            return read

        with torch.inference_mode(), self._hooked([(h, reader(h)) for h in wanted]):
            try:
                self.hf(input_ids=tokens.to(self.cfg.device), use_cache=False)
            except _StopForward:
                pass
        missing = [h for h in wanted if h not in captured]
        if missing:
            raise RuntimeError(f"hooks {missing} did not fire in a forward pass of the model")
        return [captured[h] for h in hooks]

    def loss_with_hooks(self, tokens: torch.Tensor, hooks: list[tuple[str, HookFn]]) -> torch.Tensor:
        tokens = tokens.to(self.cfg.device)
        with torch.inference_mode(), self._hooked(hooks):
            logits = self.hf(input_ids=tokens, use_cache=False).logits
        per_token = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
        )
        return per_token.view(tokens.shape[0], -1)

    @contextmanager
    def _hooked(self, hooks: list[tuple[str, HookFn]]) -> Iterator[None]:
        """`hooks` registered on their modules for the duration of the block."""
        handles = []
        try:
            for name, fn in hooks:
                path, is_input = (name[: -len(INPUT_SUFFIX)], True) if name.endswith(INPUT_SUFFIX) else (name, False)
                if path not in self.modules or not path:  # check_hook catches this earlier, as a UserError
                    raise ValueError(f"hook {name!r} is not a module path of the model")
                module = self.modules[path]
                if is_input:
                    handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_output_hook(fn)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _output_hook(fn: HookFn) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return fn(output)
        new = fn(output[0])  # tuples and ModelOutputs: the hidden states come first
        if new is None:
            return None
        if isinstance(output, tuple):
            return (new, *output[1:])
        output[next(iter(output.keys()))] = new
        return output

    return hook


def _input_hook(fn: HookFn) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        key = next(iter(kwargs))  # called with keywords only: the first is the main input
        new = fn(kwargs[key])
        return None if new is None else (args, {**kwargs, key: new})

    return hook


def _layers_path(hf: nn.Module) -> str:
    """The path of the decoder layers' ModuleList (`model.layers`, `transformer.h`, ...)."""
    n_layers = getattr(hf.config, "num_hidden_layers", None)
    for path, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return path
    return ""


def load(where: str | Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any]) -> HFLanguageModel:
    """From a local HF directory (Path) or a hub name (str), through AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(where, Path) and not (where / "config.json").exists():
        raise UserError(f"config key 'model.name': {where} has no config.json (not a HF model directory)")
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **tokenizer_kwargs(kwargs))
    return HFLanguageModel(hf.to(device).eval(), tokenizer)
