"""Hydra launcher `hydra/launcher=slurm_ddp`: a sweep member as one SLURM job of several
tasks, one data-parallel rank each.

Lives in Hydra's `hydra_plugins` namespace because Hydra only instantiates launchers
from there. See slurm_ddp_launcher.py.
"""
