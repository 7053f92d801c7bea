"""Write an SAE in SAELens's on-disk format: cfg.json + sae_weights.safetensors,
and sparsity.safetensors (log10 firing rate per latent over the eval window) when
the caller has measured it.

`sae_lens.SAE.load_from_disk(path)` loads the result with identical encode/decode.
Written into a temporary sibling directory and renamed, so a crash never leaves a
half-written `sae/` behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

import saesweep
from saesweep.atomic import staged_dir
from saesweep.sae import SAE
from saesweep.sae_format.read import CFG_FILENAME, SPARSITY_FILENAME, SPARSITY_KEY, WEIGHTS_FILENAME

# The SAELens on-disk format version our files follow (its loader reads it from
# metadata.sae_lens_version and would otherwise apply pre-6.0 key renames).
SAE_LENS_FORMAT_VERSION = "6.0.0"


def sae_lens_config(sae: SAE, metadata: dict[str, Any]) -> dict[str, Any]:
    transcoder = sae.transcoder or sae.d_out != sae.d_in
    architecture = (transcoder and sae.export_transcoder_architecture) or sae.export_architecture
    return {
        "architecture": architecture,
        "d_in": sae.d_in,
        **({"d_out": sae.d_out} if transcoder else {}),
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        # Any input scaling is folded into the saved weights.
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.export_config(),
        "metadata": {
            "sae_lens_version": SAE_LENS_FORMAT_VERSION,
            "saesweep_version": saesweep.__version__,
            "training_architecture": sae.cfg.architecture,
            **metadata,
        },
    }


def save_sae(sae: SAE, directory: Path, metadata: dict[str, Any], sparsity: Optional[torch.Tensor] = None) -> Path:
    """Write the SAE (and `sparsity`, [d_sae] log10 firing rates, if given) as one directory."""
    if sparsity is not None and tuple(sparsity.shape) != (sae.d_sae,):
        raise ValueError(f"sparsity has shape {list(sparsity.shape)}; expected [{sae.d_sae}]")
    directory = Path(directory)
    with staged_dir(directory) as staging:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in sae.export_tensors().items()}
        save_file(tensors, str(staging / WEIGHTS_FILENAME))
        if sparsity is not None:
            save_file({SPARSITY_KEY: sparsity.detach().float().cpu().contiguous()}, str(staging / SPARSITY_FILENAME))
        (staging / CFG_FILENAME).write_text(json.dumps(sae_lens_config(sae, metadata), indent=2))
    return directory
