# Marks conf/ as the package `saesweep.conf` (pyproject.toml maps it), so the YAML tree
# ships in the wheel and is found with importlib.resources. Nothing to import here.
