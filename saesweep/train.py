"""The training entrypoint: `python -m saesweep.train [overrides]` (Hydra)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saesweep.config import validate
from saesweep.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("saesweep")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        typed = validate(cfg)
        from saesweep.trainer import train  # heavy imports only after the config is known good

        result = train(typed, Path(hydra_cfg.runtime.output_dir))
    except UserError as e:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # let the launcher record this member as failed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    log.info("eval: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return result.get("explained_variance")


if __name__ == "__main__":
    main()
