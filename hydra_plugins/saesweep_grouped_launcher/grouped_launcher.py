"""Run a batch of sweep members as one job: `--multirun hydra/launcher=grouped ...`.

Hydra's basic launcher calls the task once per member (`hydra.core.utils.run_job`).
This one does per member what run_job does around the task — output dir, `.hydra/`
files, job callbacks before and after, a JobReturn — but calls the app's group task
once with every member's config, so the members share one LM pass (to the deepest of
their hook points). What a member may vary is `may_differ` (the rest must be equal, or
there is nothing to share).
"""

# No `from __future__ import annotations`: Hydra execs plugin modules without registering
# them in sys.modules, and dataclasses then cannot resolve string annotations.

import copy
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    _save_config,
    configure_log,
    env_override,
    filter_overrides,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class GroupedLauncherConf:
    _target_: str = "hydra_plugins.saesweep_grouped_launcher.grouped_launcher.GroupedLauncher"
    # Called once per batch of members: group_task(configs, hydra_configs) -> per member
    # the task's return value, or the exception that failed it.
    group_task: str = "saesweep.train.main_group"
    # Config keys (or whole sections) members may set differently.
    # Hook points may differ: the LM runs once, to the deepest of them, and feeds each its members.
    may_differ: list = field(
        default_factory=lambda: [
            "sae",
            "optimizer",
            "scheduler",
            "objectives",
            "logger.job_name",
            "model.hook_point",
            "model.hook_point_out",
        ]
    )


ConfigStore.instance().store(
    group="hydra/launcher", name="saesweep_grouped", node=GroupedLauncherConf, provider="saesweep"
)


class GroupedLauncher(Launcher):
    def __init__(self, group_task: str, may_differ: Sequence[str]) -> None:
        self.group_task_name = group_task
        self.may_differ = list(may_differ)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return self.run_members(list(enumerate(job_overrides, start=initial_job_idx)))

    def run_members(self, numbered: Sequence[tuple[int, Sequence[str]]]) -> list[JobReturn]:
        """Train these (member number, overrides) together in this process; their JobReturns.
        Also what each job of hydra/launcher=slurm_grouped runs."""
        from saesweep.errors import UserError

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        group_task = self._group_task()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs as one group (one LM pass)", len(numbered))

        configs = []
        for idx, overrides in numbered:
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = idx
                config.hydra.job.num = idx
            configs.append(config)
        check_group(configs, self.may_differ, UserError)

        saved_hydra_cfg = HydraConfig.instance().cfg
        try:
            returns = [self._start_member(config) for config in configs]
            self._log_to_member_files(configs)
            try:
                with env_override(configs[0].hydra.job.env_set):
                    outcomes = group_task([r.cfg for r in returns], [r.hydra_cfg.hydra for r in returns])
            except Exception as e:  # nothing shared could be set up: every member failed with it
                outcomes = [e] * len(returns)
            for config, ret, outcome in zip(configs, returns, outcomes):
                self._end_member(config, ret, outcome)
        finally:
            HydraConfig.instance().cfg = saved_hydra_cfg
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def _group_task(self) -> Callable[..., list[Any]]:
        from saesweep.errors import UserError

        task = get_method(self.group_task_name)
        # By file, not module name: under `python -m` the app's module is __main__.
        if inspect.getsourcefile(self.task_function) != inspect.getsourcefile(task):
            raise UserError(
                f"config key 'hydra.launcher.group_task': {self.group_task_name} belongs to another app than "
                f"{inspect.getsourcefile(self.task_function)}; hydra/launcher=grouped runs python -m saesweep.train sweeps"
            )
        return task

    def _start_member(self, config: DictConfig) -> JobReturn:
        """run_job's part before the task: output dir, .hydra/, on_job_start."""
        HydraConfig.instance().set_config(config)
        output_dir = os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        HydraConfig.instance().set_config(config)
        task_cfg = copy.deepcopy(config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret = JobReturn(
            cfg=task_cfg,
            hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg),
            overrides=OmegaConf.to_container(config.hydra.overrides.task),
            working_dir=os.getcwd(),
        )
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if config.hydra.output_subdir is not None:
            hydra_output = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir)
            _save_config(task_cfg, "config.yaml", hydra_output)
            _save_config(ret.hydra_cfg, "hydra.yaml", hydra_output)
            _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
        self.hydra_context.callbacks.on_job_start(config=config, task_function=self.task_function)
        return ret

    def _end_member(self, config: DictConfig, ret: JobReturn, outcome: Any) -> None:
        """run_job's part after the task: status, return value, on_job_end."""
        HydraConfig.instance().set_config(config)
        ret.status = JobStatus.FAILED if isinstance(outcome, Exception) else JobStatus.COMPLETED
        ret.return_value = outcome
        ret.task_name = JobRuntime.instance().get("name")
        for handler in logging.getLogger().handlers:
            handler.flush()
        self.hydra_context.callbacks.on_job_end(config=config, job_return=ret)

    def _log_to_member_files(self, configs: list[DictConfig]) -> None:
        """The job log of member 0's config, plus a file per other member: each member's
        `<job>.log` gets the group's shared records and its own, not the other members'
        (records the trainer tags with a run_dir)."""
        HydraConfig.instance().set_config(configs[0])
        configure_log(configs[0].hydra.job_logging, configs[0].hydra.verbose)
        root = logging.getLogger()
        files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        if len(files) != 1:
            return  # a custom job_logging: leave it as configured
        first = files[0]
        first.addFilter(_OnlyMember(configs[0].hydra.runtime.output_dir))
        for config in configs[1:]:
            name = os.path.basename(first.baseFilename)
            handler = logging.FileHandler(os.path.join(config.hydra.runtime.output_dir, name))
            handler.setFormatter(first.formatter)
            handler.setLevel(first.level)
            handler.addFilter(_OnlyMember(config.hydra.runtime.output_dir))
            root.addHandler(handler)


class _OnlyMember(logging.Filter):
    def __init__(self, run_dir: str) -> None:
        super().__init__()
        self.run_dir = str(run_dir)

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "run_dir", self.run_dir) == self.run_dir


def check_group(configs: list[DictConfig], may_differ: Sequence[str], error: type[Exception]) -> None:
    """Raise `error` naming the first key, outside may_differ, where a member differs from member 0."""

    def flat(config: DictConfig) -> dict[str, Any]:
        HydraConfig.instance().set_config(config)  # for ${hydra:...} interpolations
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        return dict(_dotted(OmegaConf.to_container(task, resolve=True)))

    def shared(key: str) -> bool:
        return not any(key == k or key.startswith(k + ".") for k in may_differ)

    first = flat(configs[0])
    for config in configs[1:]:
        other = flat(config)
        for key in sorted(set(first) | set(other)):
            if shared(key) and first.get(key) != other.get(key):
                raise error(
                    f"config key '{key}': differs between grouped members ({first.get(key)!r} vs {other.get(key)!r}); "
                    f"a group may vary only {', '.join(may_differ)}. Drop hydra/launcher=grouped or split the sweep"
                )


def _dotted(node: Any, prefix: str = "") -> Any:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _dotted(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node
