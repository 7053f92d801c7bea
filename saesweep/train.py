"""The training entrypoint: `python -m saesweep.train [overrides]` (Hydra)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saesweep.cli import run, user_errors
from saesweep.config import CONF_DIR
from saesweep.config.schema import objective_values, validate
from saesweep.errors import UserError
from saesweep.training.run_record import RunRecord

log = logging.getLogger("saesweep")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    hydra_cfg = HydraConfig.get()
    record = RunRecord.from_hydra(cfg, hydra_cfg)  # before name_wandb_run fills in logger names
    name_wandb_run(cfg, hydra_cfg)
    try:
        with user_errors():
            typed = validate(cfg, hydra_cfg.overrides.task)
            # heavy imports only after the config is known good
            from saesweep.training.distributed import process_group, shared_run_dir
            from saesweep.training.loop import train

            # training.distributed=ddp: this process is one rank; the others run this too.
            with process_group(typed.training) as ranks:
                run_dir = shared_run_dir(ranks, Path(hydra_cfg.runtime.output_dir))
                result = train(typed, run_dir, ranks, record)
    except KeyboardInterrupt:
        print(f"interrupted; rerun with hydra.run.dir={hydra_cfg.runtime.output_dir} to resume", file=sys.stderr)
        sys.exit(130)
    if not ranks.is_main:
        return None  # rank 0 evaluated and reports
    log.info("eval: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    # What an optimising sweeper (hydra/sweeper=pareto) minimises; grids ignore it.
    return objective_values(result, typed.objectives)


def main_group(cfgs: list[DictConfig], hydra_cfgs: list[DictConfig]) -> list[Any]:
    """`main` for the members of a grouped sweep (hydra/launcher=grouped), trained together
    on one LM pass: per member the objective values, or the exception that failed it."""
    typed: list[Any] = []
    records = [RunRecord.from_hydra(cfg, hydra_cfg) for cfg, hydra_cfg in zip(cfgs, hydra_cfgs)]
    for cfg, hydra_cfg in zip(cfgs, hydra_cfgs):
        name_wandb_run(cfg, hydra_cfg)
        try:
            typed.append(check_not_distributed(validate(cfg, hydra_cfg.overrides.task)))
        except UserError as e:  # this member fails, the others train
            typed.append(e)
    valid = [i for i, t in enumerate(typed) if not isinstance(t, UserError)]
    if not valid:
        return typed
    from saesweep.training.loop import train_group

    sweep_dir = hydra_cfgs[0].sweep.dir
    try:
        results = train_group(
            [typed[i] for i in valid],
            [Path(hydra_cfgs[i].runtime.output_dir) for i in valid],
            resume_hint=f"hydra.sweep.dir={sweep_dir}",
            records=[records[i] for i in valid],
        )
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same sweep with hydra.sweep.dir={sweep_dir} to resume", file=sys.stderr)
        sys.exit(130)
    outcomes = list(typed)
    for i, result in zip(valid, results):
        if isinstance(result, Exception):
            outcomes[i] = result
            continue
        log.info(
            "eval %s: %s",
            hydra_cfgs[i].runtime.output_dir,
            {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
            extra={"run_dir": hydra_cfgs[i].runtime.output_dir},
        )  # into this member's log only
        outcomes[i] = objective_values(result, typed[i].objectives)
    return outcomes


def check_not_distributed(typed: Any) -> Any:
    """A group trains its members in one process, which cannot also be one rank of many."""
    from saesweep.training.distributed import launched

    launch = launched()
    if typed.training.distributed != "none" or (launch is not None and launch.world > 1):
        raise UserError(
            "config key 'training.distributed': hydra/launcher=grouped trains its members together "
            "in one process and does not run data-parallel; use training.distributed=none with one "
            "process, or hydra/launcher=slurm_ddp for ddp"
        )
    return typed


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
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:  # maybe one rank of several (torch import)
        from saesweep.training.distributed import rank_overrides

        try:
            sys.argv += rank_overrides(sys.argv[1:])  # ranks other than 0 write nothing
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    run(main)


if __name__ == "__main__":
    cli()
