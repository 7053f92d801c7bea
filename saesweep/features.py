"""`python -m saesweep.features RUN_DIR`: what a run's latents respond to, as RUN_DIR/features.html.

For a random sample of the latents that fired and for the most and the least frequent
ones: their top-activating contexts on the held-out rows (each token shaded by the
latent's activation), their activation histogram, and the tokens their decoder
direction promotes and suppresses through the unembedding. The run's own model, hook
and dataset come from RUN_DIR/.hydra/config.yaml; the SAE is RUN_DIR/sae/. See
saesweep.latents.browser for what exactly is scanned and chosen.

A run dir without `.hydra/config.yaml` or `sae/` (or not a directory) is a one-line
`error:` with exit code 2, and nothing is written.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from saesweep.cli import OneLineArgumentParser
from saesweep.errors import UserError

EXPECTED = "a run directory of python -m saesweep.train (with .hydra/config.yaml and sae/)"


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise UserError(f"'{run_dir}' does not exist; expected {EXPECTED}")
    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is not a directory; expected {EXPECTED}")
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' has no .hydra/config.yaml (the run's config); expected {EXPECTED}")
    if not (run_dir / "sae" / "cfg.json").is_file():
        raise UserError(
            f"'{run_dir}' has no sae/cfg.json: the SAE is exported at the end of training (or on Ctrl-C); "
            f"expected {EXPECTED}"
        )


def load_run_config(run_dir: Path):  # -> TrainConfig (typed lazily: the schema imports nothing heavy)
    from omegaconf import OmegaConf

    from saesweep.config.schema import validate

    path = run_dir / ".hydra" / "config.yaml"
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # YAML syntax, unreadable file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable config ({first})") from None
    try:
        return validate(raw)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def parse_args(argv: list[str] | None):
    p = OneLineArgumentParser(
        prog="python -m saesweep.features",
        description="Write RUN_DIR/features.html: top contexts, activation histograms and logit effects of latents.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run dir (with .hydra/config.yaml and sae/)")
    p.add_argument("--sample", type=int, default=32, help="latents drawn at random among those that fired (32)")
    p.add_argument("--extremes", type=int, default=8, help="most and least frequent latents shown, each (8)")
    p.add_argument("--contexts", type=int, default=10, help="top contexts per latent (10)")
    p.add_argument("--rows", type=int, default=None, help="held-out rows to scan (default: the run's eval.rows)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per LM pass (default: the run's eval.batch_rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample (0)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    for name in ("sample", "extremes"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    for name in ("contexts", "rows", "batch_rows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.sample + 2 * args.extremes == 0:
        p.error("--sample and --extremes are both 0: no latent to show")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        p.error(f"--device {args.device!r}: valid: auto, cpu, cuda, cuda:N")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    try:
        check_run_dir(args.run_dir)
        cfg = load_run_config(args.run_dir)
        import torch  # after the cheap checks: a mistyped path answers at once

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA GPU is visible; use auto or cpu")
        if args.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(args.device)

        from saesweep.latents.browser import BrowserOptions, build

        options = BrowserOptions(
            sample=args.sample,
            extremes=args.extremes,
            contexts=args.contexts,
            rows=args.rows,
            batch_rows=args.batch_rows,
            seed=args.seed,
        )
        # Libraries print progress to stdout (TransformerLens: "Moving model to device"); the
        # command's stdout is the page's path alone, for scripts.
        with contextlib.redirect_stdout(sys.stderr):
            path = build(args.run_dir, cfg, options, device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; features.html not written", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
