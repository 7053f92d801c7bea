"""Hydra launcher `hydra/launcher=slurm_grouped`: a sweep's groups as SLURM jobs, one LM pass each.

Lives in Hydra's `hydra_plugins` namespace because Hydra only instantiates launchers
from there. See slurm_grouped_launcher.py.
"""
