"""The training entrypoint: `python -m saesweep.train [overrides]` (Hydra)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saesweep.config import objective_values, validate
from saesweep.cli import run, user_errors

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("saesweep")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | list[float]:
    hydra_cfg = HydraConfig.get()
    name_wandb_run(cfg, hydra_cfg)
    try:
        with user_errors():
            typed = validate(cfg)
            from saesweep.trainer import train  # heavy imports only after the config is known good

            result = train(typed, Path(hydra_cfg.runtime.output_dir))
    except KeyboardInterrupt:
        print(f"interrupted; rerun with hydra.run.dir={hydra_cfg.runtime.output_dir} to resume", file=sys.stderr)
        sys.exit(130)
    log.info("eval: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    # What an optimising sweeper (hydra/sweeper=pareto) minimises; grids ignore it.
    return objective_values(result, typed.objectives)


def name_wandb_run(cfg: DictConfig, hydra_cfg: Any) -> None:
    """Sweep members share a W&B group named after the sweep dir; runs are named by their overrides."""
    logger = cfg.get("logger")
    if not logger:
        return
    if logger.get("group") is None and hydra_cfg.mode == RunMode.MULTIRUN:
        logger.group = str(hydra_cfg.sweep.dir)
    if logger.get("job_name") is None and hydra_cfg.job.override_dirname:
        logger.job_name = hydra_cfg.job.override_dirname


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
