"""Read any SAE directory in SAELens's on-disk format, for inference only.

A SAELens SAE directory holds `cfg.json` and `sae_weights.safetensors` (and maybe
`sparsity.safetensors`). This module turns one into a small module with `encode`
and `decode` for the inference architectures SAELens saves most: standard, topk,
jumprelu and gated (plus plain ReLU transcoders). It is independent of saesweep's
training modules and of sae_lens itself, so `saesweep.evaluate` can measure SAEs
from any tool the same way it measures ours.

Every problem with the directory is a UserError naming the file and what is wrong:
users point this at directories downloaded or copied by hand.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from saesweep.errors import UserError

log = logging.getLogger(__name__)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSITY_KEY = "sparsity"  # the tensor name SAELens reads from sparsity.safetensors

# architecture -> tensors beyond W_dec and b_dec that its encoder needs
ENCODER_TENSORS = {
    "standard": ("W_enc", "b_enc"),
    "topk": ("W_enc", "b_enc"),
    "jumprelu": ("W_enc", "b_enc", "threshold"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag"),
    "transcoder": ("W_enc", "b_enc"),
}
# "expected_average_only_in" with no scaling factor on disk: SAELens's own inference
# ignores it too (the factor lives in its release list), so the SAE reads raw input.
SUPPORTED_NORMALIZATION = ("none", "expected_average_only_in")


class SAEDirError(UserError):
    """A SAE directory that cannot be read; the message names the file."""


class LoadedSAE(nn.Module):
    """An SAE read from disk: `encode(x) -> acts`, `decode(acts) -> x_hat` on raw activations.

    Exposes what saesweep.evaluation.held_out reads of an SAE: W_enc (for its device), d_in,
    d_out, d_sae, encode and decode.
    """

    def __init__(self, architecture: str, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path):
        super().__init__()
        self.architecture = architecture
        self.cfg = cfg
        self.path = path
        self.d_in = int(cfg["d_in"])
        self.d_sae = int(cfg["d_sae"])
        self.d_out = int(tensors["W_dec"].shape[1])
        # SAELens's default, except for transcoders, whose b_dec has the output's width
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", architecture != "transcoder"))
        self.k = int(cfg["k"]) if architecture == "topk" else None
        self.rescale_by_decoder_norm = bool(cfg.get("rescale_acts_by_decoder_norm", False))
        for name, value in tensors.items():
            self.register_buffer(name, value)

    @property
    def metadata(self) -> dict[str, Any]:
        return metadata_of(self.cfg)

    @property
    def hook_name(self) -> Optional[str]:
        return self.metadata.get("hook_name")

    @property
    def hook_name_out(self) -> Optional[str]:
        out = self.metadata.get("hook_name_out")
        return out if out and out != self.hook_name else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        if self.architecture == "gated":
            # The gate decides which latents fire; the magnitude path (the same
            # encoder directions, rescaled by exp(r_mag)) decides how much.
            gate = (x @ self.W_enc + self.b_gate) > 0
            magnitude = torch.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            return magnitude * gate
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            if self.rescale_by_decoder_norm:
                pre = pre * self.W_dec.norm(dim=-1)
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return torch.relu(pre)

    @torch.no_grad()
    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        if self.architecture == "topk" and self.rescale_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        return acts @ self.W_dec + self.b_dec


def metadata_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens >= 6 keeps hook and model names under `metadata`; older files at top level."""
    meta = cfg.get("metadata")
    legacy = {
        k: cfg[k]
        for k in ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path")
        if k in cfg
    }
    if "hook_point" in cfg and "hook_name" not in legacy:  # SAELens < 6 spelling
        legacy["hook_name"] = cfg["hook_point"]
    return {**legacy, **(meta if isinstance(meta, dict) else {})}


def read_cfg(directory: Path) -> dict[str, Any]:
    """cfg.json as a dict, checked for the keys every architecture needs."""
    path = directory / CFG_FILENAME
    if not path.is_file():
        raise SAEDirError(f"{path}: missing; a SAELens SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    try:
        cfg = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise SAEDirError(f"{path}: not a text file (expected a JSON object)") from None
    except json.JSONDecodeError as e:
        raise SAEDirError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except OSError as e:
        raise SAEDirError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise SAEDirError(
            f"{path}: holds a JSON {type(cfg).__name__}; expected an object with d_in, d_sae, architecture"
        )

    if "architecture" not in cfg:
        version = cfg.get("sae_lens_version") or metadata_of(cfg).get("sae_lens_version")
        if version is None or str(version).split(".")[0].isdigit() and int(str(version).split(".")[0]) < 6:
            cfg["architecture"] = "standard"  # SAELens < 6 wrote no architecture for its ReLU SAEs
        else:
            raise SAEDirError(f"{path}: missing key 'architecture'; valid: {', '.join(ENCODER_TENSORS)}")
    arch = cfg["architecture"]
    if arch not in ENCODER_TENSORS:
        raise SAEDirError(
            f"{path}: key 'architecture' is {arch!r}, which saesweep cannot evaluate; "
            f"valid: {', '.join(ENCODER_TENSORS)}"
        )
    for key in ("d_in", "d_sae") + (("k",) if arch == "topk" else ()):
        if key not in cfg:
            raise SAEDirError(f"{path}: missing key {key!r} (a positive integer)")
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SAEDirError(f"{path}: key {key!r} is {value!r}; expected a positive integer")
    if arch == "topk" and cfg["k"] > cfg["d_sae"]:
        raise SAEDirError(f"{path}: key 'k' is {cfg['k']}, more than d_sae {cfg['d_sae']}")
    for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise SAEDirError(f"{path}: key {key!r} is {cfg[key]!r}; expected true or false")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in SUPPORTED_NORMALIZATION:
        raise SAEDirError(
            f"{path}: normalize_activations {norm!r} is not supported by saesweep; "
            f"valid: {', '.join(SUPPORTED_NORMALIZATION)}"
        )
    if norm == "expected_average_only_in":
        log.warning(
            "%s: normalize_activations is expected_average_only_in but no scaling factor is "
            "stored; evaluating on raw activations, as SAELens does",
            path,
        )
    meta = metadata_of(cfg)
    if meta.get("hook_head_index") is not None:
        raise SAEDirError(f"{path}: hook_head_index {meta['hook_head_index']} (one attention head) is not supported")
    return cfg


def read_tensors(directory: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights, in float32, checked for presence, shape and finiteness."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILENAME
    if not path.is_file():
        raise SAEDirError(f"{path}: missing; a SAELens SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SAEDirError(f"{path}: not a readable safetensors file ({first})") from None

    arch = cfg["architecture"]
    if arch == "jumprelu" and "threshold" not in raw and "log_threshold" in raw:
        raw["threshold"] = raw.pop("log_threshold").exp()  # older JumpReLU checkpoints
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    # An SAE reconstructs its input; only a transcoder (SAELens's, with d_out, or ours,
    # with metadata.hook_name_out) maps to a different width.
    if "d_out" in cfg:
        d_out = cfg["d_out"]
        if isinstance(d_out, bool) or not isinstance(d_out, int) or d_out <= 0:
            raise SAEDirError(f"{directory / CFG_FILENAME}: key 'd_out' is {d_out!r}; expected a positive integer")
    elif (arch == "transcoder" or metadata_of(cfg).get("hook_name_out")) and getattr(raw.get("W_dec"), "ndim", 0) == 2:
        d_out = raw["W_dec"].shape[-1]
    else:
        d_out = d_in
    shapes = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "threshold": (d_sae,),
        "b_gate": (d_sae,),
        "r_mag": (d_sae,),
        "b_mag": (d_sae,),
        "W_dec": (d_sae, d_out),
        "b_dec": (d_out,),
    }
    tensors = {}
    for name in (*ENCODER_TENSORS[arch], "W_dec", "b_dec"):
        if name not in raw:
            raise SAEDirError(
                f"{path}: no tensor {name!r}; a {arch} SAE needs "
                f"{', '.join((*ENCODER_TENSORS[arch], 'W_dec', 'b_dec'))} (found: {', '.join(sorted(raw)) or 'none'})"
            )
        t = raw[name]
        if tuple(t.shape) != shapes[name]:
            raise SAEDirError(
                f"{path}: tensor {name!r} has shape {list(t.shape)}; expected {list(shapes[name])} "
                f"from {CFG_FILENAME} (d_in={d_in}, d_sae={d_sae})"
            )
        if not t.is_floating_point():
            raise SAEDirError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected a float type")
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise SAEDirError(f"{path}: tensor {name!r} holds NaN or infinite values")
        tensors[name] = t.contiguous()
    extra = sorted(set(raw) - set(tensors) - {"log_threshold"})
    if extra:
        log.warning("%s: ignoring tensors a %s SAE does not use: %s", path, arch, ", ".join(extra))
    if arch == "transcoder" and cfg.get("apply_b_dec_to_input"):
        raise SAEDirError(f"{path}: a transcoder cannot have apply_b_dec_to_input true")
    if arch != "transcoder" and d_out != d_in and cfg.get("apply_b_dec_to_input", True):
        raise SAEDirError(
            f"{path}: W_dec maps to width {d_out} but d_in is {d_in}; with a different output width "
            "apply_b_dec_to_input must be false"
        )
    return tensors


def load_sae_dir(path: str | Path, device: torch.device | str = "cpu") -> LoadedSAE:
    """Read and check a SAELens-format SAE directory; UserError naming the file if it is broken."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise SAEDirError(f"SAE directory {directory}: does not exist")
    if not directory.is_dir():
        raise SAEDirError(
            f"{directory}: not a directory; expected a SAELens SAE directory ({CFG_FILENAME} + {WEIGHTS_FILENAME})"
        )
    cfg = read_cfg(directory)
    tensors = read_tensors(directory, cfg)
    sae = LoadedSAE(cfg["architecture"], cfg, tensors, directory)
    sae.eval()
    return sae.to(device)


def read_sparsity(path: str | Path, d_sae: int) -> torch.Tensor:
    """log10 firing rates from a sparsity.safetensors file, checked against the SAE's width."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SAEDirError(f"{path}: not a readable safetensors file ({first})") from None
    if SPARSITY_KEY not in tensors:
        raise SAEDirError(f"{path}: no tensor {SPARSITY_KEY!r} (found: {', '.join(sorted(tensors)) or 'none'})")
    sparsity = tensors[SPARSITY_KEY]
    if tuple(sparsity.shape) != (d_sae,):
        raise SAEDirError(f"{path}: tensor {SPARSITY_KEY!r} has shape {list(sparsity.shape)}; expected [{d_sae}]")
    return sparsity


def log10_firing_rate(fire_counts: torch.Tensor, tokens: int, floor: float = 1e-10) -> torch.Tensor:
    """SAELens's `sparsity` values: log10 of each latent's firing rate; never-fired -> log10(floor)."""
    rate = fire_counts.double() / max(tokens, 1)
    return torch.log10(rate.clamp_min(floor)).float()


def activation_width(shape: torch.Size | tuple[int, ...]) -> int:
    """Width an SAE sees for activations of this [batch, pos, ...] shape (heads flattened)."""
    return math.prod(shape[2:])
