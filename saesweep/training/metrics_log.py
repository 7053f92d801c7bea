"""Where training metrics go: metrics.jsonl always, Weights & Biases when asked."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from saesweep.config.schema import LoggerConfig


class MetricsLog:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, run_config: Any):
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.wandb_run = None
        self.log_weights = cfg.log_weights
        if cfg.name == "wandb":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                name=cfg.job_name,
                mode=cfg.mode,
                dir=str(run_dir),
                config=asdict(run_config),
                # a requeued job continues the same W&B run
                id=_stable_run_id(run_dir),
                resume="allow",
                # A group trains several runs in one process; the default would hand the
                # second member the first member's run.
                reinit="create_new",
            )

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def final(self, result: dict[str, Any], log10_rate: Any = None, sae_dir: Path | None = None) -> None:
        """The evaluation into the W&B summary, with the histogram of log10 firing rates
        (`log10_rate`, dead latents at -10) that SAELens logs, and `sae_dir` as an artifact."""
        if self.wandb_run is None:
            return
        import wandb

        summary = {f"eval/{k}": v for k, v in result.items()}
        if log10_rate is not None:
            summary["eval/log10_feature_density"] = wandb.Histogram(log10_rate.double().numpy(), num_bins=50)
        self.wandb_run.summary.update(summary)
        if self.log_weights and sae_dir is not None:
            artifact = wandb.Artifact(f"sae-{self.wandb_run.id}", type="model", metadata=dict(result))
            artifact.add_dir(str(sae_dir))
            self.wandb_run.log_artifact(artifact, aliases=["final"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class NullMetricsLog(MetricsLog):
    """Where a data-parallel rank other than 0 logs: nowhere (rank 0 writes the run's metrics)."""

    def __init__(self) -> None:
        self.file = None
        self.wandb_run = None

    def log(self, record: dict[str, Any]) -> None:
        pass

    def final(self, result: dict[str, Any], log10_rate: Any = None, sae_dir: Path | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _stable_run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
