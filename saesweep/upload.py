"""Share finished runs on the Hugging Face hub in SAELens's layout.

    python -m saesweep.upload RUN_OR_SWEEP_DIR --repo-id USER/NAME [--stage-dir DIR] [--dry-run] [--private]

Finds the finished runs under the directory (a run dir holding `sae/` and
`eval.json`: one run, a sweep dir, or a tree of them), stages the repository
SAELens's hub loader reads, and pushes it with `huggingface_hub`:

    README.md               model card: one row of eval metrics per SAE, how to load them
    pretrained_saes.yaml    the same SAEs as an entry of SAELens's release list
    <sae id>/cfg.json, sae_weights.safetensors, sparsity.safetensors, eval.json

`sae_lens.SAE.from_pretrained("USER/NAME", "<sae id>")` loads a folder. SAE ids:
- the hook name (cfg.json metadata.hook_name) when one run is shared;
- for several runs, the hook name plus the overrides that differ between them, from
  each run's .hydra/overrides.yaml: `blocks.6.hook_resid_post__sae.k-16`
  (`key-value` pairs joined by `__`; characters other than letters, digits, `.`,
  `_` and `-` become `-`);
- if that still leaves two runs with one id, the run dir's name is appended.

--dry-run stages and stops: look at the staged folder before pushing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from saesweep.errors import UserError

log = logging.getLogger("saesweep.upload")

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Files copied into each SAE's folder: SAELens's three, plus our eval.json.
SAE_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
MAX_DEPTH = 4  # multirun/DATE/TIME/N is three levels below multirun/
METRIC_COLUMNS = (
    ("l0", "L0"),
    ("explained_variance", "explained variance"),
    ("ce_loss_score", "CE loss score"),
    ("dead_fraction", "dead fraction"),
)


class PushError(Exception):
    """The hub refused or could not be reached; the staged files are still there."""


@dataclass
class Run:
    path: Path
    cfg: dict[str, Any]
    metrics: dict[str, Any]
    overrides: Optional[dict[str, str]]
    sae_id: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, Any]:
        meta = self.cfg.get("metadata")
        return meta if isinstance(meta, dict) else {}

    @property
    def hook_name(self) -> str:
        return str(self.metadata.get("hook_name") or "sae")


def is_finished_run(path: Path) -> bool:
    return (path / "eval.json").is_file() and (path / "sae" / "cfg.json").is_file()


def find_runs(root: Path) -> tuple[list[Path], list[Path]]:
    """(finished run dirs, unfinished ones) at or below root, in path order (members numerically)."""
    if not root.exists():
        raise UserError(f"{root}: does not exist; expected a run dir (with sae/ and eval.json) or a sweep dir")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory; expected a run dir (with sae/ and eval.json) or a sweep dir")
    finished, unfinished = [], []

    def walk(path: Path, depth: int) -> None:
        if is_finished_run(path):
            finished.append(path)
            return
        if (path / ".hydra").is_dir():
            unfinished.append(path)
            return
        if depth < MAX_DEPTH:
            for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                walk(child, depth + 1)

    walk(root, 0)

    def order(p: Path) -> tuple:
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in p.relative_to(root).parts)

    return sorted(finished, key=order), sorted(unfinished, key=order)


def read_run(path: Path) -> Run:
    from saesweep.sweep.members import parse_overrides

    try:
        cfg = json.loads((path / "sae" / "cfg.json").read_text())
        metrics = json.loads((path / "eval.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read its cfg.json or eval.json ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(metrics, dict):
        raise UserError(f"{path}: sae/cfg.json and eval.json must each hold a JSON object")
    try:
        listed = yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        listed = None
    overrides = parse_overrides(listed) if isinstance(listed, list) else None
    return Run(path, cfg, metrics, overrides)


def safe_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def assign_sae_ids(runs: list[Run]) -> None:
    """Readable, unique folder names: hook name, then differing overrides, then dir names."""
    from saesweep.sweep.members import differing_overrides

    keys = differing_overrides([r.overrides for r in runs]) if len(runs) > 1 else []
    for run in runs:
        parts = [safe_part(run.hook_name)]
        for key in keys:
            value = (run.overrides or {}).get(key)
            if value is not None:
                parts.append(safe_part(f"{key.lstrip('+~')}-{value}"))
        run.sae_id = "__".join(parts)
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.sae_id] = seen.get(run.sae_id, 0) + 1
    for run in runs:
        if seen[run.sae_id] > 1:
            run.sae_id = f"{run.sae_id}__run-{safe_part(run.path.name)}"
    ids = [r.sae_id for r in runs]
    if len(set(ids)) != len(ids):  # two runs in same-named dirs of different sweeps
        for i, run in enumerate(runs):
            run.sae_id = f"{run.sae_id}-{i}"


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link costs no disk for multi-GB weights; copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—"
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    return str(value)


def model_card(repo_id: str, runs: list[Run]) -> str:
    models = sorted({str(r.metadata.get("model_name")) for r in runs if r.metadata.get("model_name")})
    datasets = sorted({str(r.metadata.get("dataset_path")) for r in runs if r.metadata.get("dataset_path")})
    header = "| SAE id | architecture | d_sae | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |"
    rows = [header, "|" + "---|" * (3 + len(METRIC_COLUMNS))]
    for run in runs:
        cells = [f"`{run.sae_id}`", str(run.cfg.get("architecture", "?")), fmt(run.cfg.get("d_sae"))]
        cells += [fmt(run.metrics.get(key)) for key, _ in METRIC_COLUMNS]
        rows.append("| " + " | ".join(cells) + " |")
    windows = sorted({r.metrics.get("dead_window_tokens") for r in runs if r.metrics.get("dead_window_tokens")})
    bos = {r.metrics.get("bos_excluded") for r in runs}
    first = runs[0].sae_id
    lines = [
        "---",
        "library_name: saelens",
        "tags:",
        "- sparse-autoencoder",
        "- saelens",
        "- saesweep",
        "---",
        "",
        f"# Sparse autoencoders{' for ' + ', '.join(models) if models else ''}",
        "",
        f"{len(runs)} SAE{'s' if len(runs) != 1 else ''} trained with "
        f"saesweep on activations of {', '.join(models) or 'a language model'}"
        f"{' (dataset: ' + ', '.join(datasets) + ')' if datasets else ''}, "
        "in SAELens's format: one folder per SAE id.",
        "",
        *rows,
        "",
        "Metrics are from each run's `eval.json`, measured on held-out rows never trained on"
        + (f" ({', '.join(str(w) for w in windows)} tokens" if windows else "")
        + (", BOS positions excluded)" if bos == {True} else ")" if windows else "")
        + ". Explained variance is 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over all eval tokens; "
        "the CE loss score is (CE_ablation − CE_sae) / (CE_ablation − CE_clean) with the SAE "
        "spliced in at every position but BOS; dead = never active in the eval window.",
        "",
        "## Load",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "{first}")',
        "```",
        "",
        "Each folder holds `cfg.json` and `sae_weights.safetensors` (input scaling folded in: the SAE "
        "reads raw activations at `cfg.json`'s `metadata.hook_name`), `sparsity.safetensors` (log10 "
        "firing rate per latent over the eval window; −10 = never fired) and `eval.json`. "
        "`pretrained_saes.yaml` lists them as an entry of SAELens's release directory.",
        "",
    ]
    return "\n".join(lines)


def release_entry(repo_id: str, runs: list[Run]) -> dict[str, Any]:
    """The SAEs as one release of SAELens's pretrained_saes.yaml."""
    models = [r.metadata.get("model_name") for r in runs if r.metadata.get("model_name")]
    saes = []
    for run in runs:
        entry: dict[str, Any] = {"id": run.sae_id, "path": run.sae_id}
        for key, name in (("l0", "l0"), ("explained_variance", "variance_explained")):
            value = run.metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[name] = round(float(value), 4)
        saes.append(entry)
    return {repo_id.split("/")[1]: {"repo_id": repo_id, "model": models[0] if models else None, "saes": saes}}


def stage(root: Path, repo_id: str, stage_dir: Path) -> list[Run]:
    """Lay out the hub repository for the finished runs under root in stage_dir."""
    from saesweep.sae_format.read import SPARSITY_FILENAME, load_sae_dir, read_sparsity

    finished, unfinished = find_runs(root)
    if unfinished:
        log.warning(
            "skipping %d unfinished run(s) without eval.json: %s",
            len(unfinished),
            ", ".join(str(p) for p in unfinished[:5]) + (" ..." if len(unfinished) > 5 else ""),
        )
    if not finished:
        raise UserError(f"{root}: no finished runs (a finished run dir holds sae/cfg.json and eval.json)")
    runs = [read_run(p) for p in finished]
    for run in runs:
        sae = load_sae_dir(run.path / "sae")  # never push a directory SAELens could not load
        if (run.path / "sae" / SPARSITY_FILENAME).exists():
            read_sparsity(run.path / "sae" / SPARSITY_FILENAME, sae.d_sae)
        else:
            log.warning("%s has no %s (exported before saesweep wrote it)", run.path / "sae", SPARSITY_FILENAME)
    assign_sae_ids(runs)

    if stage_dir.exists() and any(stage_dir.iterdir()):
        raise UserError(f"--stage-dir {stage_dir}: not empty; give a new or empty directory")
    stage_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        folder = stage_dir / run.sae_id
        folder.mkdir()
        for name in SAE_FILES:
            if (run.path / "sae" / name).exists():
                link_or_copy(run.path / "sae" / name, folder / name)
        shutil.copy2(run.path / "eval.json", folder / "eval.json")
    (stage_dir / "README.md").write_text(model_card(repo_id, runs))
    (stage_dir / "pretrained_saes.yaml").write_text(yaml.safe_dump(release_entry(repo_id, runs), sort_keys=False))
    return runs


def push(stage_dir: Path, repo_id: str, private: bool, message: str) -> str:
    """Create the repo if needed and upload the staged folder as one commit; the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(stage_dir), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as e:  # network, auth, permissions: all end the same way for the user
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise PushError(f"{type(e).__name__}: {first}") from None
    return str(getattr(info, "commit_url", info))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m saesweep.upload", description="Push finished runs to the Hugging Face hub in SAELens's layout."
    )
    p.add_argument("path", type=Path, help="a run dir (with sae/ and eval.json), a sweep dir, or a tree of them")
    p.add_argument("--repo-id", required=True, help="hub model repository, USER/NAME (created if missing)")
    p.add_argument(
        "--stage-dir",
        type=Path,
        default=None,
        help="where to lay out the repository (new or empty); default: a temporary directory",
    )
    p.add_argument("--dry-run", action="store_true", help="stage only; print where, push nothing")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit-message", default=None, help="default: 'Upload N SAEs with saesweep'")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    args = parse_args(argv)
    if not REPO_ID.match(args.repo_id):
        print(
            f"error: --repo-id {args.repo_id!r}: expected USER/NAME (letters, digits, '.', '_', '-')", file=sys.stderr
        )
        return 2
    stage_dir = args.stage_dir or Path(tempfile.mkdtemp(prefix="saesweep-upload-"))
    try:
        runs = stage(args.path, args.repo_id, stage_dir)
    except UserError as e:
        if args.stage_dir is None:
            shutil.rmtree(stage_dir, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        log.info("%s <- %s", run.sae_id, run.path)
    if args.dry_run:
        print(f"staged {len(runs)} SAE(s) for {args.repo_id} in {stage_dir} (dry run: nothing pushed)")
        return 0
    message = args.commit_message or f"Upload {len(runs)} SAE{'s' if len(runs) != 1 else ''} with saesweep"
    try:
        url = push(stage_dir, args.repo_id, args.private, message)
    except PushError as e:
        print(
            f"error: pushing to hub repo {args.repo_id} failed ({e}); the staged files are in {stage_dir}",
            file=sys.stderr,
        )
        return 1
    print(f"pushed {len(runs)} SAE(s) to https://huggingface.co/{args.repo_id} ({url})")
    if args.stage_dir is None:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
