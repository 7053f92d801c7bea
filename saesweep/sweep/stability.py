"""Feature stability across sweep members: do two SAEs learn the same latents?

A latent's direction is its decoder row (`W_dec[i]` of the exported SAE, unit-normalised).
Each latent of member A is matched to the latent of member B whose direction has the
largest cosine with it; A's stability in B is the fraction of A's latents whose best
match reaches MATCH_THRESHOLD (0.9). Signed cosine, not its absolute value: latents
fire with positive activations only, so a row and its negative write opposite things.
The match is not symmetric (one latent of B can be the best match of several of A's;
the SAEs can differ in width), so both directions are computed and reported: A in B
and B in A. Every latent counts, dead ones included; a zero row matches nothing.

The pairs compared are members whose resolved configs (`.hydra/config.yaml`) differ in
exactly one key, and that key is `training.seed` (same setup, another seed: how
reproducible are the latents?) or `sae.k` (another sparsity: which latents survive?).
Keys that only name or route a run (`logger.*`, `objectives`) are not compared.

Matching is one matrix product per pair, in row blocks to bound memory. Results are
kept in the sweep dir's stability.json with the size and mtime of both weight files,
so the report, refreshed as each member ends, computes each pair once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saesweep.atomic import atomic_write_text

log = logging.getLogger(__name__)

MATCH_THRESHOLD = 0.9
STABILITY_KEYS = ("training.seed", "sae.k")
IGNORED_PREFIXES = ("logger.", "objectives")
CACHE_NAME = "stability.json"
# Elements of one block of the cosine matrix (fp32: 256 MB).
BLOCK_ELEMENTS = 64 * 2**20


@dataclass
class PairStability:
    a: str  # member names
    b: str
    key: str  # the one config key they differ in
    value_a: str
    value_b: str
    d_sae_a: int
    d_sae_b: int
    a_in_b: float  # fraction of a's latents whose best match in b has cosine >= MATCH_THRESHOLD
    b_in_a: float
    mean_best_a: float  # mean over a's latents of the best cosine in b
    mean_best_b: float


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"sae": {"k": 16}} -> {"sae.k": 16}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Flat keys whose values differ (absent counts as a value), ignoring naming-only keys."""
    keys = dict.fromkeys([*a, *b])
    return [k for k in keys if not k.startswith(IGNORED_PREFIXES) and a.get(k, _ABSENT) != b.get(k, _ABSENT)]


_ABSENT = object()


def comparable_pairs(configs: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(a, b, key) for members whose flat configs differ in exactly one key of STABILITY_KEYS."""
    names = list(configs)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            keys = differing_keys(configs[a], configs[b])
            if len(keys) == 1 and keys[0] in STABILITY_KEYS:
                pairs.append((a, b, keys[0]))
    return pairs


def unit_rows(w: Any) -> Any:
    """Rows scaled to unit norm; a zero row stays zero (its cosine with anything is 0)."""
    import torch

    w = w.double() if w.dtype == torch.float64 else w.float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def best_match_cosines(a: Any, b: Any) -> tuple[Any, Any]:
    """For decoders a [n_a, d] and b [n_b, d]: each row's largest cosine with any row of the
    other, as ([n_a], [n_b]). Computed in blocks of a's rows."""
    import torch

    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders of different widths: {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = unit_rows(a), unit_rows(b.to(a.device))
    best_a = torch.empty(len(a), dtype=a.dtype, device=a.device)
    best_b = torch.full((len(b),), -torch.inf, dtype=a.dtype, device=a.device)
    block = max(1, BLOCK_ELEMENTS // max(len(b), 1))
    for start in range(0, len(a), block):
        sims = a[start : start + block] @ b.T
        best_a[start : start + block] = sims.max(dim=1).values
        best_b = torch.maximum(best_b, sims.max(dim=0).values)
    return best_a, best_b


def match_fractions(a: Any, b: Any, threshold: float = MATCH_THRESHOLD) -> tuple[float, float, float, float]:
    """(a in b, b in a, mean best cosine of a's rows, of b's rows) for decoders a and b."""
    best_a, best_b = best_match_cosines(a, b)
    return (
        float((best_a >= threshold).double().mean()),
        float((best_b >= threshold).double().mean()),
        float(best_a.double().mean()),
        float(best_b.double().mean()),
    )


def _signature(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def load_decoder(weights: Path, device: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt", device=device) as f:
        return f.get_tensor("W_dec")


def sweep_stability(
    configs: dict[str, dict[str, Any]], weights: dict[str, Path], cache_dir: Path | None = None
) -> list[PairStability]:
    """Stability of every comparable pair among members with exported weights.

    `configs`: member name -> flat config; `weights`: member name -> sae_weights.safetensors.
    With `cache_dir`, earlier results for the same weight files are reused from (and new
    ones saved to) its stability.json. A pair whose weights cannot be read is left out.
    """
    import torch

    pairs = comparable_pairs({n: c for n, c in configs.items() if n in weights})
    if not pairs:
        return []
    cache_path = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    cached = _read_cache(cache_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    decoders: dict[str, Any] = {}
    results, changed = [], False
    for a, b, key in pairs:
        try:
            sig = {a: _signature(weights[a]), b: _signature(weights[b])}
        except OSError:
            continue
        entry = cached.get(f"{a}|{b}")
        if isinstance(entry, dict) and entry.get("signatures") == sig and entry.get("key") == key:
            try:
                results.append(PairStability(**entry["result"]))
                continue
            except TypeError:  # written by another version: compute it again
                pass
        try:
            for name in (a, b):
                if name not in decoders:
                    decoders[name] = load_decoder(weights[name], device)
            fractions = match_fractions(decoders[a], decoders[b])
        except Exception as e:  # an unreadable or odd weight file: say so, skip the pair
            log.warning("stability of members %s and %s not computed: %s: %s", a, b, type(e).__name__, e)
            continue
        result = PairStability(
            a,
            b,
            key,
            str(configs[a].get(key)),
            str(configs[b].get(key)),
            int(decoders[a].shape[0]),
            int(decoders[b].shape[0]),
            *fractions,
        )
        results.append(result)
        cached[f"{a}|{b}"] = {"key": key, "signatures": sig, "result": asdict(result)}
        changed = True
    if cache_path is not None and changed:
        text = json.dumps({"threshold": MATCH_THRESHOLD, "pairs": cached}, indent=1) + "\n"
        atomic_write_text(cache_path, text)
    return results


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(data, dict)
        or data.get("threshold") != MATCH_THRESHOLD
        or not isinstance(data.get("pairs"), dict)
    ):
        return {}
    return data["pairs"]
