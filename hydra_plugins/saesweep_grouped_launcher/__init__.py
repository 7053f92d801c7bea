"""Hydra launcher `hydra/launcher=grouped`: a sweep's members trained together, one LM pass.

Lives in Hydra's `hydra_plugins` namespace because Hydra only instantiates launchers
from there. See grouped_launcher.py.
"""
