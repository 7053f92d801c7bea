"""Partition a sweep into SLURM jobs of members that share one LM pass:
`--multirun hydra/launcher=slurm_grouped ...`.

hydra-submitit-launcher submits one job per member and runs Hydra's `run_job` in it. This
launcher plans first (saesweep.sweep.jobs: groups by the grouped launcher's may_differ,
split by members_per_job and device_memory_gb), prints the plan and writes it to
`<sweep dir>/slurm_grouped_plan.json`, then submits one array task per job. Each task
runs what `hydra/launcher=grouped` runs in one process (GroupedLauncher.run_members): per
member a run dir, `.hydra/`, callbacks and a JobReturn around one call of the group task.

The launcher itself is the submitted callable, so submitit's checkpointing resubmits the
same job with the same members (BaseSubmititLauncher.checkpoint); the trainer saves every
member's checkpoint on USR2/TERM before that, and the requeued job resumes each from its
own. Members whose run dir holds eval.json already are not submitted again.
"""

# No `from __future__ import annotations`: Hydra execs plugin modules without registering
# them in sys.modules, and dataclasses then cannot resolve string annotations.

import copy
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from hydra_plugins.saesweep_grouped_launcher.grouped_launcher import GroupedLauncher, GroupedLauncherConf, _dotted

log = logging.getLogger(__name__)


@dataclass
class SlurmGroupedConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.saesweep_slurm_grouped_launcher.slurm_grouped_launcher.SlurmGroupedLauncher"
    # As hydra/launcher=grouped: the function that trains a job's members, and the keys
    # members may set differently and still share one LM pass.
    group_task: str = GroupedLauncherConf.group_task
    may_differ: List[str] = field(default_factory=lambda: list(GroupedLauncherConf().may_differ))
    # At most this many members per job; null: as many as device_memory_gb allows.
    members_per_job: Optional[int] = None
    # A job's estimated device memory (LM weights, a buffer per hook point, per member its
    # SAE, gradients, Adam state and step activations) stays within this; null: no limit.
    device_memory_gb: Optional[float] = None


ConfigStore.instance().store(
    group="hydra/launcher", name="saesweep_slurm_grouped", node=SlurmGroupedConf, provider="saesweep"
)

OWN_KEYS = ("group_task", "may_differ", "members_per_job", "device_memory_gb")


class SlurmGroupedLauncher(SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        own = {k: params.pop(k) for k in OWN_KEYS}
        super().__init__(**params)
        for key, value in own.items():
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            setattr(self, key, value)

    # ------------------------------------------------------------------ in the SLURM job
    def __call__(self, numbered: List[Tuple[int, List[str]]], singleton_state: Dict[Any, Any]) -> List[JobReturn]:
        Singleton.set_state(singleton_state)
        # `scontrol requeue` (and scancel) send SIGTERM, then SIGKILL after KillWait; submitit
        # ignores SIGTERM. The trainer checkpoints every member on it and hands it on to this
        # handler, which ends the job: SLURM has requeued it already, and training on would
        # only be killed mid-way.
        signal.signal(signal.SIGTERM, _end_on_sigterm)
        grouped = _InJob(self.group_task, self.may_differ)
        grouped.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        return grouped.run_members(numbered)

    # ------------------------------------------------------------------ in the sweep command
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from saesweep.atomic import atomic_write_text
        from saesweep.errors import UserError
        from saesweep.sweep.jobs import GB, PLAN_NAME, PlanError, plan_jobs, plan_record, plan_text

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        checked = GroupedLauncher(self.group_task, self.may_differ)
        checked.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        checked._group_task()  # the same app as the sweep's, checked here where its source file is known
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = idx
                config.hydra.job.num = idx
            configs.append(config)
        saved = HydraConfig.instance().cfg
        try:
            described = [self._describe(config) for config in configs]
        finally:
            HydraConfig.instance().cfg = saved
        planned = _only_differing([d[0] for d in described])
        finished = [m for m, (_, _, done) in zip(planned, described) if done is not None]
        to_run = [m for m, (_, _, done) in zip(planned, described) if done is None]
        budget = None if self.device_memory_gb is None else int(float(self.device_memory_gb) * GB)
        try:
            jobs = plan_jobs(to_run, self.members_per_job, budget, max((d[1] for d in described), default=0))
        except PlanError as e:
            raise UserError(str(e)) from None
        text = plan_text(jobs, finished)
        log.info("%s", text)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parallelism = int(self.params.get("array_parallelism", 256))
        record = plan_record(jobs, finished, parallelism)
        atomic_write_text(sweep_dir / PLAN_NAME, json.dumps(record, indent=1) + "\n")

        by_number: Dict[int, JobReturn] = {}
        for member, (_, _, done) in zip(planned, described):
            if done is not None:
                by_number[member.number] = done
        if jobs:
            executor = self._executor(submitit)
            numbered = {c.hydra.job.num: list(o) for c, o in zip(configs, job_overrides)}
            params = [([(n, numbered[n]) for n in job.numbers], Singleton.get_state()) for job in jobs]
            submitted = executor.map_array(self, *zip(*params))
            log.info("submitted %d job(s): %s", len(submitted), ", ".join(j.job_id for j in submitted))
            for entry, sub in zip(record["jobs"], submitted):
                entry["slurm_job_id"] = sub.job_id  # what squeue and sacct show
            atomic_write_text(sweep_dir / PLAN_NAME, json.dumps(record, indent=1) + "\n")
            by_config = {int(c.hydra.job.num): c for c in configs}
            for job, sub in zip(jobs, submitted):
                try:
                    returns = sub.results()[0]
                except Exception as e:  # the job died with no result (killed, out of memory):
                    log.error("job %s ended with no result: %s", sub.job_id, e)  # its members fail,
                    returns = [_failed(by_config[n], e) for n in job.numbers]  # the others' are kept
                for number, ret in zip(job.numbers, returns):
                    by_number[number] = ret
        return [by_number[c.hydra.job.num] for c in configs]

    def _executor(self, submitit: Any) -> Any:
        """hydra-submitit-launcher's SLURM executor, as BaseSubmititLauncher.launch builds it."""
        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder"), "slurm_max_num_timeout": params.pop("max_num_timeout")}
        executor = submitit.AutoExecutor(cluster="slurm", **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def _describe(self, config: DictConfig) -> Tuple[Any, int, Optional[JobReturn]]:
        """(the member as the planner sees it, its LM's bytes, its JobReturn if it has finished)."""
        from saesweep.config.schema import objective_values, validate
        from saesweep.errors import UserError
        from saesweep.sweep.jobs import PlannedMember, buffer_bytes, sae_bytes

        HydraConfig.instance().set_config(config)  # for ${hydra:...} interpolations
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        flat = dict(_dotted(OmegaConf.to_container(task, resolve=True)))
        shared = tuple(
            sorted(
                (k, repr(v))
                for k, v in flat.items()
                if not any(k == d or k.startswith(d + ".") for d in self.may_differ)
            )
        )
        number = int(config.hydra.job.num)
        overrides = tuple(filter_overrides(list(config.hydra.overrides.task)))
        member_bytes = buffer = lm = 0
        done = None
        try:
            typed = validate(task, config.hydra.overrides.task)
        except UserError:
            typed = None  # refused in its job, with the group task's own message
        if typed is not None:
            width, lm = _model_size(typed)
            if width:
                d_sae = typed.sae.width(width)
                member_bytes = sae_bytes(width, d_sae, typed.training.batch_size)
                buffer = buffer_bytes(typed.buffer.size_tokens, typed.training.batch_size, width)
            run_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
            if typed.training.resume != "never" and (run_dir / "eval.json").is_file():
                try:
                    result = json.loads((run_dir / "eval.json").read_text())
                    done = JobReturn(
                        overrides=list(config.hydra.overrides.task),
                        cfg=task,
                        hydra_cfg=copy.deepcopy(config),
                        working_dir=os.getcwd(),
                        task_name=str(config.hydra.job.name),
                        status=JobStatus.COMPLETED,
                        _return_value=objective_values(result, typed.objectives),
                    )
                except (OSError, ValueError, KeyError):
                    done = None  # the job rereads it and says what is wrong
        member = PlannedMember(number, overrides, shared, str(flat.get("model.hook_point")), member_bytes, buffer)
        return member, lm, done


def _failed(config: DictConfig, error: Exception) -> JobReturn:
    """The JobReturn of a member whose job ended without returning one."""
    ret = JobReturn(
        overrides=list(config.hydra.overrides.task),
        hydra_cfg=config,
        working_dir=os.getcwd(),
        task_name=str(config.hydra.job.name),
        status=JobStatus.FAILED,
    )
    ret.return_value = error
    return ret


def _only_differing(members: List[Any]) -> List[Any]:
    """The members with only the overrides that tell them apart (what the plan shows)."""
    import dataclasses

    from saesweep.sweep.members import differing_overrides, parse_overrides

    keys = set(differing_overrides([parse_overrides(list(m.overrides)) for m in members]))
    return [
        dataclasses.replace(m, overrides=tuple(o for o in m.overrides if o.split("=", 1)[0].lstrip("+~") in keys))
        for m in members
    ]


def _end_on_sigterm(signum: int, frame: Any) -> None:
    log.warning("SIGTERM: ending this job (requeued by SLURM, or cancelled); checkpoints written")
    sys.exit(128 + signum)


class _InJob(GroupedLauncher):
    def _group_task(self) -> Any:
        # In the job the app's task arrives pickled by value (it lived in __main__), without
        # a source file to compare; the sweep command checked it before submitting.
        return get_method(self.group_task_name)


def _model_size(typed: Any) -> Tuple[int, int]:
    """(the hook's width, the LM's weight bytes) from the model's config.json; 0s when unknown."""
    from saesweep.lm.model import embedded_target_dir
    from saesweep.lm.shape import ModelShape
    from saesweep.sweep.jobs import lm_bytes

    model = typed.model
    folder = (
        embedded_target_dir(model.name, typed.cache_dir)
        if model.source == "embedded"
        else Path(model.name).expanduser()
    )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0, 0
    dtype_bytes = 4 if str(getattr(model.dtype, "value", model.dtype)) == "float32" else 2
    return ModelShape.from_config(config).hook_width(model.hook_point) or 0, lm_bytes(config, dtype_bytes)
