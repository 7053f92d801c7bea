"""Evaluate any SAELens-format SAE directory: `python -m saesweep.evaluate path/to/sae`.

A Hydra app over the same `model` and `dataset` groups as training (conf/evaluate.yaml).
It loads the SAE with saesweep's own reader (saesweep.sae_format.read, no sae_lens needed),
runs the training's evaluation code on the dataset's held-out rows, and writes into
the run dir (or `out_dir`):
- eval.json — the metrics of a training run's eval.json (l0, mse, explained_variance,
  dead_fraction, dead_window_tokens, ce_*), plus what was evaluated (sae_path,
  architecture, widths, hooks, model, dataset). Training-only keys (tokens_trained,
  tokens_per_second) are absent: nothing was trained;
- density.png — histogram of log10 firing rates, dead latents counted in the title;
- sparsity.safetensors — the same rates in SAELens's format.

The hook defaults to the one recorded in the SAE's cfg.json (metadata.hook_name), so
an SAE is measured where it was trained unless `model.hook_point=` says otherwise. Hook
names belong to a backend (TransformerLens hook points, or HF module paths), so with the
recorded hook the backend follows cfg.json's metadata.model_class_name too.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saesweep.cli import run, user_errors
from saesweep.config import CONF_DIR
from saesweep.config.domain import SliceSpec
from saesweep.config.schema import EvaluateConfig, check_positions, validate_evaluate
from saesweep.errors import UserError

log = logging.getLogger("saesweep.evaluate")


def resolve_hooks(cfg: EvaluateConfig, sae: Any) -> tuple[str, str | None]:
    """The input hook (config, else the SAE's own) and the output hook for a transcoder."""
    hook_in = cfg.model.hook_point or sae.hook_name
    if not hook_in:
        raise UserError(
            f"config key 'model.hook_point': {sae.path / 'cfg.json'} records no hook_name; "
            "set model.hook_point to the hook the SAE reads (e.g. blocks.6.hook_resid_post)"
        )
    hook_out = cfg.model.hook_point_out or (sae.hook_name_out if not cfg.model.hook_point else None)
    return hook_in, (hook_out if hook_out != hook_in else None)


def resolve_positions(cfg: EvaluateConfig, sae: Any) -> dict[str, Any]:
    """ActivationSource's position keywords: activations.* where set, else what the SAE's
    cfg.json records, else training's defaults. SAELens records exclude_special_tokens as a
    bool or a list of token ids, and seqpos_slice as slice()'s arguments."""
    meta = sae.metadata
    special = cfg.activations.exclude_special_tokens
    if special is None:
        special = meta.get("exclude_special_tokens") or False
    positions = cfg.activations.seqpos_slice
    if positions is None:
        positions = list(meta.get("seqpos_slice") or [None])
        if SliceSpec().problem(positions) is not None:
            raise UserError(
                f"{sae.path / 'cfg.json'}: metadata.seqpos_slice {positions} is not slice()'s arguments; "
                "set activations.seqpos_slice (e.g. [null] for every position)"
            )
        check_positions(positions, cfg.dataset.context_size)
    return {"exclude_bos": cfg.activations.exclude_bos, "exclude_special_tokens": special, "seqpos_slice": positions}


# SAELens's metadata.model_class_name -> our model.backend
BACKEND_OF_CLASS = {"AutoModelForCausalLM": "hf", "HookedTransformer": "transformer_lens"}


def resolve_backend(cfg: EvaluateConfig, sae: Any) -> None:
    """With the SAE's own hook, run the backend that hook name belongs to."""
    recorded = BACKEND_OF_CLASS.get(sae.metadata.get("model_class_name"))
    if cfg.model.hook_point is None and recorded is not None and recorded != cfg.model.backend:
        log.info(
            "%s was trained on the %s backend (cfg.json model_class_name); evaluating with model.backend=%s",
            sae.path,
            recorded,
            recorded,
        )
        cfg.model.backend = recorded


def check_widths(
    sae: Any, widths: tuple[int | None, int | None], hook_in: str, hook_out: str | None, model_name: str
) -> None:
    """The SAE's widths against the model's widths at the input and output hooks (None: unknown)."""
    for (what, want, hook), got in zip(
        [("d_in", sae.d_in, hook_in), ("d_out", sae.d_out, hook_out or hook_in)], widths
    ):
        if got is not None and want != got:
            raise UserError(
                f"{sae.path / 'cfg.json'}: the SAE's {what} is {want} but hook {hook!r} of model "
                f"{model_name!r} has width {got}; choose the model and hook it was trained on "
                "(model=..., model.hook_point=...)"
            )


def probed_widths(source: Any) -> tuple[int, int]:
    """The widths at a source's hooks, from a two-token pass."""
    import torch

    from saesweep.sae_format.read import activation_width

    probe = torch.full((1, 2), source.bos or 0, dtype=torch.long)
    widths = [activation_width(a.shape) for a in source.hook_activations(probe)]
    return widths[0], widths[-1]


def plot_density(log10_rate: Any, dead: int, tokens: int, path: Path, title: str) -> None:
    """Histogram of log10 firing rates of the latents that fired; dead ones in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saesweep.atomic import atomic_write

    alive = log10_rate[log10_rate > -10].double().numpy()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if len(alive):
        ax.hist(alive, bins=50, color="#4C72B0")
    ax.set_xlabel("log10 firing rate (fraction of eval tokens a latent is active on)")
    ax.set_ylabel("latents")
    d_sae = len(log10_rate)
    ax.set_title(
        f"{title}\n{dead} of {d_sae} latents dead ({100 * dead / d_sae:.1f} %, never active in {tokens:,} tokens)",
        fontsize=10,
    )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run_evaluation(cfg: EvaluateConfig, out_dir: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from saesweep.activations.source import ActivationSource
    from saesweep.atomic import atomic_write, atomic_write_text
    from saesweep.data.rows import load_token_rows
    from saesweep.evaluation.held_out import evaluate
    from saesweep.lm.model import check_hook, load_model, model_shape
    from saesweep.sae_format.read import SPARSITY_FILENAME, SPARSITY_KEY, load_sae_dir
    from saesweep.training.allocator import keep_freed_memory
    from saesweep.training.distributed import resolve_device

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device, "device")
    sae = load_sae_dir(cfg.sae_path, device)  # before the model: a broken SAE dir fails fast
    hook_in, hook_out = resolve_hooks(cfg, sae)
    resolve_backend(cfg, sae)
    recorded = sae.metadata.get("model_name")
    if recorded and recorded != cfg.model.name:
        log.warning("the SAE records model %r; evaluating it on model.name=%r", recorded, cfg.model.name)

    shape = model_shape(cfg.model, cfg.cache_dir)  # config.json, where it is on disk: before the weights load
    if shape is not None:
        widths = (shape.hook_width(hook_in), shape.hook_width(hook_out or hook_in))
        check_widths(sae, widths, hook_in, hook_out, cfg.model.name)

    keep_freed_memory()  # see allocator.py
    model = load_model(cfg.model, device, cfg.cache_dir)
    check_hook(model, hook_in, "model.hook_point")
    if hook_out is not None:
        check_hook(model, hook_out, "model.hook_point_out")
    if cfg.dataset.context_size > model.cfg.n_ctx:
        raise UserError(
            f"config key 'dataset.context_size': {cfg.dataset.context_size} exceeds the model's n_ctx {model.cfg.n_ctx}"
        )
    positions = resolve_positions(cfg, sae)
    source = ActivationSource(model, hook_in, hook_out, **positions)
    check_widths(sae, probed_widths(source), hook_in, hook_out, cfg.model.name)

    rows = load_token_rows(cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.seed).eval_rows[: cfg.eval.rows]
    if cfg.eval.rows is not None and len(rows) < cfg.eval.rows:
        log.warning("only %d held-out rows (eval.rows=%d)", len(rows), cfg.eval.rows)
    log.info(
        "evaluating %s (%s, d_in=%d, d_sae=%d) at %s on %d held-out rows",
        sae.path,
        sae.architecture,
        sae.d_in,
        sae.d_sae,
        hook_in,
        len(rows),
    )
    start = time.perf_counter()
    result = evaluate(sae, source, rows, len(rows), cfg.eval.ce_rows, cfg.eval.batch_rows)
    log10_rate = result.log10_firing_rate()
    dead = int((result.fire_counts == 0).sum())
    result.update(
        eval_seconds=time.perf_counter() - start,
        bos_excluded=cfg.activations.exclude_bos,
        exclude_special_tokens=positions["exclude_special_tokens"],
        seqpos_slice=positions["seqpos_slice"],
        sae_path=str(Path(cfg.sae_path).expanduser().resolve()),
        architecture=sae.architecture,
        d_in=sae.d_in,
        d_out=sae.d_out,
        d_sae=sae.d_sae,
        hook_point=hook_in,
        hook_point_out=hook_out,
        model_name=cfg.model.name,
        dataset_path=cfg.dataset.path,
        eval_rows=len(rows),
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "eval.json", json.dumps(dict(result), indent=2) + "\n")
    atomic_write(out_dir / SPARSITY_FILENAME, lambda tmp: save_file({SPARSITY_KEY: log10_rate.contiguous()}, str(tmp)))
    plot_density(
        log10_rate,
        dead,
        int(result["dead_window_tokens"]),
        out_dir / "density.png",
        f"{sae.architecture} SAE at {hook_in}: {'/'.join(Path(cfg.sae_path).parts[-3:])}",
    )
    log.info("wrote %s, density.png, %s to %s", "eval.json", SPARSITY_FILENAME, out_dir)
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        with user_errors():
            typed = validate_evaluate(cfg, hydra_cfg.overrides.task)
            out_dir = Path(typed.out_dir).expanduser() if typed.out_dir else Path(hydra_cfg.runtime.output_dir)
            result = run_evaluation(typed, out_dir)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    summary = {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in result.items()
        if k in ("l0", "explained_variance", "mse", "dead_fraction", "ce_loss_score")
    }
    log.info("eval: %s", summary)
    return result.get("explained_variance")


def positional_sae_path(argv: list[str]) -> list[str]:
    """`evaluate PATH ...` -> `evaluate sae_path='PATH' ...`: a first argument that is
    neither an override (no '=') nor a flag is the SAE directory. Quoted, so paths with
    Hydra grammar characters (',', '=', spaces) arrive intact."""
    if len(argv) > 1 and not argv[1].startswith("-") and ("=" not in argv[1] or Path(argv[1]).is_dir()):
        escaped = argv[1].replace("'", "\\'")
        escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)  # before the closing quote
        return [argv[0], f"sae_path='{escaped}'", *argv[2:]]
    return argv


def cli() -> None:
    sys.argv = positional_sae_path(sys.argv)
    run(main)


if __name__ == "__main__":
    cli()
