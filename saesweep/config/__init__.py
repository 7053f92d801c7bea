"""The config: where its YAML lives (`CONF_DIR`) and the typed schema it must fit
(`saesweep.config.schema`).

The YAML tree is `conf/` at the top of the repository, where Hydra users look for it;
the wheel ships it as the package `saesweep.conf` (see pyproject.toml), so an installed
saesweep finds it the same way from any directory.
"""

from __future__ import annotations

from importlib.resources import files

# A real directory in both layouts (an editable checkout maps saesweep.conf to conf/);
# Hydra's config_path takes it as an absolute path.
CONF_DIR = str(files("saesweep.conf"))
