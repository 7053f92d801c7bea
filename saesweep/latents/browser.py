"""Build a run's feature browser (features.html) from its own config and held-out rows.

The run's `.hydra/config.yaml` says which model, hook and dataset; the SAE is the
exported one in `sae/` (read with saesweep.sae_format.read, as evaluation reads any
SAE). The rows are the held-out rows evaluation uses: the first `eval.rows` of the
dataset's held-out split (saesweep.data.rows.load_token_rows), with the positions
evaluation leaves out (BOS, with activations.exclude_bos) left out here too.

Latents are chosen by firing rate (saesweep.latents.collect.choose_latents). When the
scan covers exactly evaluation's rows, the rates are the run's own
sae/sparsity.safetensors; otherwise (another --rows, or a partial SAE without one) a
first pass counts them on the scanned rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from saesweep.activations.source import ActivationSource, token_filter
from saesweep.atomic import atomic_write_text
from saesweep.config.schema import TrainConfig
from saesweep.data.rows import load_token_rows
from saesweep.errors import UserError
from saesweep.latents.collect import GROUPS, LatentCollector, choose_latents
from saesweep.latents.logit_lens import logit_effects, top_tokens, unembedding
from saesweep.latents.page import LatentCard, context_tokens, features_page
from saesweep.lm.model import check_hook, load_model
from saesweep.sae_format.read import SPARSITY_FILENAME, load_sae_dir, read_sparsity
from saesweep.sweep.page import esc

log = logging.getLogger(__name__)

PAGE_NAME = "features.html"


@dataclass
class BrowserOptions:
    sample: int = 32  # latents drawn at random among those that fired
    extremes: int = 8  # most and least frequent latents shown, each
    contexts: int = 10  # top contexts per latent
    before: int = 12  # tokens shown before a context's peak
    after: int = 4  # and after it
    rows: int | None = None  # held-out rows to scan; None: the run's eval.rows
    batch_rows: int | None = None  # rows per LM pass; None: the run's eval.batch_rows
    logit_tokens: int = 10  # promoted and suppressed tokens shown, each
    seed: int = 0


def scan(source: ActivationSource, sae: Any, rows: torch.Tensor, batch_rows: int, desc: str) -> Iterator[torch.Tensor]:
    """Latent activations [rows, positions, d_sae] of each batch of rows, zero where
    evaluation does not count the token (BOS when excluded), with a progress bar."""
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_rows), desc=desc, unit="batch", dynamic_ncols=True):
            tokens = rows[start : start + batch_rows]
            x = source.hook_activations(tokens)[0]
            n, positions = x.shape[:2]
            acts = sae.encode(x.reshape(n * positions, -1).to(sae.W_enc.device)).reshape(n, positions, -1)
            yield acts * source.token_mask(tokens).to(acts.device)[..., None]


def build(run_dir: Path, cfg: TrainConfig, options: BrowserOptions, device: torch.device) -> Path:
    """Write run_dir/features.html; returns its path."""
    sae = load_sae_dir(run_dir / "sae", device)
    model = load_model(cfg.model, device, cfg.cache_dir)
    check_hook(model, cfg.model.hook_point, "model.hook_point")
    source = ActivationSource(model, cfg.model.hook_point, None, **token_filter(cfg.activations))

    n_rows = options.rows or cfg.eval.rows
    batch_rows = options.batch_rows or cfg.eval.batch_rows
    held_out = load_token_rows(cfg.dataset, model.tokenizer, cfg.eval.rows, cfg.training.seed).eval_rows
    rows = held_out[:n_rows]
    tokens_scanned = int(source.token_mask(rows).sum())
    log.info("feature browser: %d held-out rows (%d tokens counted) of %s", len(rows), tokens_scanned, cfg.dataset.path)

    sparsity_path = run_dir / "sae" / SPARSITY_FILENAME
    if len(rows) == len(held_out[: cfg.eval.rows]) and sparsity_path.exists():
        rate = 10 ** read_sparsity(sparsity_path, sae.d_sae).double()
        rate[rate <= 1e-10] = 0  # -10 is SAELens's "never fired"
        rate_source = f"the run's sae/{SPARSITY_FILENAME} (evaluation's firing rates on these rows)"
    else:
        counts = torch.zeros(sae.d_sae, dtype=torch.long)
        for acts in scan(source, sae, rows, batch_rows, "counting firings"):
            counts += (acts != 0).sum(dim=(0, 1)).cpu()
        rate = counts.double() / max(tokens_scanned, 1)
        rate_source = "a first pass over the scanned rows"
    groups = choose_latents(rate, options.sample, options.extremes, options.seed)
    chosen = [(i, g) for g in GROUPS for i in groups[g]]
    if not chosen:
        raise UserError(f"{run_dir / 'sae'}: no latent fired on the {tokens_scanned:,} scanned tokens; nothing to show")

    collector = LatentCollector([i for i, _ in chosen], options.contexts, options.before, options.after)
    index = torch.tensor([i for i, _ in chosen], device=device)
    for acts in scan(source, sae, rows, batch_rows, "held-out rows"):
        collector.update(acts.index_select(2, index))
    results = collector.results()

    promoted, suppressed, lens_note = _logit_lens(model, sae, [i for i, _ in chosen], options.logit_tokens)
    tokenizer = model.tokenizer

    def decode(token: int) -> str:
        return tokenizer.decode([token])

    cards = []
    for k, ((_, group), result) in enumerate(zip(chosen, results)):
        contexts, peaks = context_tokens(result, rows, decode)
        card = LatentCard(result, group, contexts, peaks)
        if promoted:
            card.promoted = [(decode(t), v) for t, v in promoted[k]]
            card.suppressed = [(decode(t), v) for t, v in suppressed[k]]
        cards.append(card)

    dead = int((rate == 0).sum())
    title = f"Feature browser: {'/'.join(run_dir.resolve().parts[-2:])}"
    intro = [
        f"<code>{esc(run_dir)}</code> &middot; {esc(sae.architecture)} SAE, {sae.d_sae:,} latents, at "
        f"<code>{esc(cfg.model.hook_point)}</code> of <code>{esc(cfg.model.name)}</code>",
        f"Scanned {len(rows):,} held-out rows of <code>{esc(cfg.dataset.path)}</code> ({tokens_scanned:,} tokens"
        f"{', BOS excluded' if cfg.activations.exclude_bos else ''}): the rows evaluation uses. "
        f"Firing rates for choosing latents from {esc(rate_source)}; {sae.d_sae - dead:,} latents fired, {dead:,} "
        f"did not. Shown: the {len(groups['most frequent'])} most and {len(groups['least frequent'])} least "
        f"frequent that fired, and {len(groups['random sample'])} drawn at random (seed {options.seed}) from the "
        "others that fired.",
        f"Top contexts: the {options.contexts} rows where the latent's largest activation is largest, "
        f"{options.before} tokens before the peak (outlined) and {options.after} after; shading is the activation "
        "relative to the latent's maximum; hover a token for its value.",
        lens_note,
        f"Rebuild with <code>python -m saesweep.features {esc(run_dir)}</code>.",
    ]
    page = features_page(title, intro, cards, tokens_scanned)
    path = run_dir / PAGE_NAME
    atomic_write_text(path, page)
    return path


def _logit_lens(model: Any, sae: Any, latents: list[int], k: int) -> tuple[list, list, str]:
    try:
        unembed = unembedding(model)
    except (AttributeError, ValueError) as e:
        return [], [], f"No promoted/suppressed tokens: the model's unembedding was not found ({esc(e)})."
    if sae.d_out != unembed.d_model:
        return (
            [],
            [],
            (
                f"No promoted/suppressed tokens: the SAE writes {sae.d_out} dimensions, not the residual stream's "
                f"{unembed.d_model}, so its decoder has no direct path to the logits."
            ),
        )
    directions = sae.W_dec[torch.tensor(latents, device=sae.W_dec.device)]
    effects = logit_effects(directions, unembed)
    promoted, suppressed = top_tokens(effects, k)
    centre = "centred (d &minus; mean d), " if unembed.centred else ""
    note = (
        "Promoted and suppressed tokens: the direct logit effect of the decoder direction d = W_dec[i], "
        f"{centre}times the final norm's weight where there is one, through {esc(unembed.description)}; "
        "the final norm's scaling by the residual's size and all later layers are left out, so it ranks "
        "tokens by the direct path only."
    )
    return promoted, suppressed, note
