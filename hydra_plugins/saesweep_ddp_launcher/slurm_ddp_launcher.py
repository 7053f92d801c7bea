"""hydra/launcher=slurm_ddp: each sweep member as one SLURM job of several tasks, one per GPU.

hydra-submitit-launcher pickles the launcher, and submitit's batch script starts that
pickle with `srun`, once per task; every task then calls the launcher's `__call__`, which
runs the whole Hydra job of the member (`run_job`: run dir, `.hydra/`, logging, the task
function). With training.distributed=ddp each task is one rank (SLURM_PROCID among the
step's SLURM_STEP_NUM_TASKS; see saesweep.training.distributed) and the tasks train the member
together. The sweep takes task 0's result as the member's (`job.results()[0]`), and task
0 is rank 0, the one that evaluates.

This subclass changes one thing: in every task but 0, Hydra is told not to write the
member's run dir (no `.hydra/`, no log file); rank 0 writes it.
"""

from typing import Any, Dict, List

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class SlurmDDPLauncher(SlurmLauncher):
    def __call__(
        self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str, singleton_state: Dict[Any, Any]
    ) -> Any:
        import submitit

        # Imported here: a plugin module is imported whenever any Hydra app starts.
        from saesweep.training.distributed import QUIET_RANK_OVERRIDES

        if submitit.JobEnvironment().global_rank != 0:
            sweep_overrides = [*sweep_overrides, *QUIET_RANK_OVERRIDES]
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
