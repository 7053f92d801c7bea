"""A run dir's record of the config it was trained with: `.hydra/`.

Hydra would write `.hydra/` (config.yaml, hydra.yaml, overrides.yaml) into the run dir
before our code runs, so a rerun into a finished or interrupted run dir with another
config, or a bad one, would rewrite the record of the SAE already there. conf/train.yaml
therefore sets `hydra.output_subdir: null`, and the record is written here instead: the
same three files, in Hydra's format, atomically, and only once the run dir has accepted
the config (`RunRecord.check`). A record is never written over one of different
settings: a finished run is refused with the keys that differ; a resumed run keeps its
original record and appends what changed (keys allowed to change, or any key under
`training.resume=force`) to `.hydra/resumes.yaml`.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from saesweep.atomic import atomic_write_many, atomic_write_text
from saesweep.config.domain import plain
from saesweep.errors import UserError

RECORD_DIR = ".hydra"
CONFIG_FILE, HYDRA_FILE, OVERRIDES_FILE, RESUMES_FILE = "config.yaml", "hydra.yaml", "overrides.yaml", "resumes.yaml"

# Keys that may change between an interrupted run and its resumption: none changes what
# the finished SAE is (the number of processes may not change either: Member checks it).
RESUME_MAY_CHANGE = frozenset(
    {
        "training.resume",
        "training.checkpoint_every_tokens",
        "training.log_every",
        "training.device",
        "training.compile",
        "training.distributed",
        "training.max_nonfinite_steps",
        "eval",
        "cache_dir",
        "logger",
        "objectives",
        "activations.cache_dir",
        "activations.shard_mb",
    }
)
# A finished run has been evaluated: its eval.json reflects the eval settings it had.
FINISHED_MAY_CHANGE = RESUME_MAY_CHANGE - {"eval"}

# Run dirs a run in this process has claimed (accepted its config and started in it): what
# goes wrong there afterwards is that run's to record; a dir refused before it was claimed
# stays as it was.
_claimed: set[Path] = set()


def mark_claimed(run_dir: Path) -> None:
    _claimed.add(Path(run_dir).resolve())


def claimed_here(run_dir: Path) -> bool:
    return Path(run_dir).resolve() in _claimed


def schema_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Every key's default in the training schema, the sae node's from the architecture that
    `config` names: what a config written before a key existed had in its place."""
    from saesweep.config.schema import TrainConfig
    from saesweep.sae import ARCHITECTURES

    defaults = plain(asdict(TrainConfig()))
    sae = config.get("sae")
    arch = sae.get("architecture") if isinstance(sae, dict) else None
    if arch in ARCHITECTURES:
        defaults["sae"] = plain(asdict(ARCHITECTURES[arch].config_class()))
    return defaults


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None
) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts. With `defaults`
    (schema_defaults), a key `saved` lacks is no difference while `current` holds its
    default: the key was added to the schema after `saved` was written, and the default is
    what that run had (so an upgrade can resume runs started before it)."""
    keys = sorted(set(saved) | set(current))
    out: list[str] = []
    defaults = defaults or {}
    for key in keys:
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if key not in saved and key in defaults and b == defaults[key]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            below = defaults.get(key)
            out.extend(config_differences(a, b, name + ".", below if isinstance(below, dict) else None))
        elif a != b:
            out.append(f"{name} ({a!r} -> {b!r})")
    return out


def without_keys(config: dict[str, Any], keys: frozenset[str] | set[str]) -> dict[str, Any]:
    """A copy of a nested config dict without the dotted `keys` (whole sections or leaves)."""
    out = copy.deepcopy(config)
    for key in keys:
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


@dataclass
class RunRecord:
    """What `.hydra/` holds: the composed config, Hydra's own config, and the overrides."""

    config: dict[str, Any]  # the composed job config, as a plain (unresolved) container
    hydra: dict[str, Any] | None  # {"hydra": ...}, as Hydra's hydra.yaml holds it
    overrides: list[str]

    @classmethod
    def from_hydra(cls, cfg: Any, hydra_cfg: Any) -> RunRecord:
        """The record of a Hydra job: its config (without the hydra node) and HydraConfig."""
        config = OmegaConf.to_container(cfg, resolve=False)
        config.pop("hydra", None)
        hydra = {"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)}
        return cls(config, hydra, [str(o) for o in hydra_cfg.overrides.task])

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord | None:
        """The run dir's record, or None if it has none. An unreadable one is a UserError."""
        path = Path(run_dir) / RECORD_DIR / CONFIG_FILE
        if not path.exists():
            return None
        try:
            config = yaml.safe_load(path.read_text())
            overrides_path = path.parent / OVERRIDES_FILE
            overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.exists() else []
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"{path} is unreadable ({type(e).__name__}); use a new run dir") from None
        if not isinstance(config, dict):
            raise UserError(f"{path} holds no config mapping; use a new run dir")
        return cls(config, None, list(overrides or []))

    def differences(self, recorded: RunRecord, may_change: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Dotted keys whose values differ from `recorded`, outside `may_change`."""
        return config_differences(
            without_keys(recorded.config, may_change),
            without_keys(self.config, may_change),
            defaults=schema_defaults(self.config),
        )

    def check(self, run_dir: Path, finished: bool, resume: str) -> RunRecord | None:
        """May this config run in `run_dir`? Raises a UserError naming the keys that differ
        from the run dir's record where it may not; returns that record (None: no record)."""
        recorded = RunRecord.load(run_dir)
        if recorded is None or resume == "never":
            return recorded
        if finished:
            changed = self.differences(recorded, FINISHED_MAY_CHANGE)
            if changed:
                raise UserError(
                    f"run dir {run_dir} holds a finished run of a different config: {'; '.join(changed)}. "
                    "Use a new run dir (hydra.run.dir=...), or saesweep.evaluate to measure it another way"
                )
        elif resume != "force":
            changed = self.differences(recorded, RESUME_MAY_CHANGE)
            if changed:
                raise UserError(
                    f"run dir {run_dir} holds a run of a different config: {'; '.join(changed)}. "
                    "Use a new run dir, or training.resume=force to continue anyway"
                )
        return recorded

    def write(self, run_dir: Path, recorded: RunRecord | None, resuming: bool) -> None:
        """Record this config in `run_dir`, once the run has started: the three files if the
        dir has no record (or starts afresh), else an entry in resumes.yaml for what changed."""
        directory = Path(run_dir) / RECORD_DIR
        if recorded is None or not resuming:
            directory.mkdir(parents=True, exist_ok=True)
            texts = {
                CONFIG_FILE: OmegaConf.to_yaml(OmegaConf.create(self.config)),
                OVERRIDES_FILE: OmegaConf.to_yaml(OmegaConf.create(self.overrides)),
            }
            if self.hydra is not None:
                texts[HYDRA_FILE] = OmegaConf.to_yaml(OmegaConf.create(self.hydra))
            atomic_write_many({directory / name: _writer(text) for name, text in texts.items()})
            (directory / RESUMES_FILE).unlink(missing_ok=True)  # a fresh start has no resumptions
            return
        changed = self.differences(recorded)
        if not changed:
            return
        path = directory / RESUMES_FILE
        entries = yaml.safe_load(path.read_text()) if path.exists() else None
        entries = entries if isinstance(entries, list) else []
        now = datetime.datetime.now().isoformat(timespec="seconds")
        entries.append({"at": now, "overrides": self.overrides, "changed": changed})
        atomic_write_text(path, yaml.safe_dump(entries, sort_keys=False))


def _writer(text: str) -> Any:
    return lambda tmp: tmp.write_text(text)
