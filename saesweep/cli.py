"""How every command shows a user's mistake: one `error: ...` line naming the key or
file and what would be valid, exit code 2, no traceback.

`run` calls a command's @hydra.main function and turns a UserError, or Hydra's own
report of a bad override (an unknown group option, a misspelled key, a syntax error,
several lines about its search path), into that one line. Bugs keep their traceback.
`--debug` (or HYDRA_FULL_ERROR=1) shows the traceback of everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from saesweep.errors import UserError

# Set by `run`: the user asked for tracebacks.
DEBUG = False


@contextmanager
def user_errors() -> Iterator[None]:
    """Inside a Hydra task: a UserError of a single run is printed as one line (exit 2)
    before Hydra can add its own report of the failed job; in a multirun it propagates,
    so the launcher records the member as failed, and `run` prints it at the end."""
    try:
        yield
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN or DEBUG:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# What sbatch says, and the launcher keys (conf/hydra/launcher/slurm*.yaml) that ask for it.
SBATCH_CAUSES = (  # every match counts; no bare "gpu": a partition may be named so
    (("partition",), ("partition",)),
    (("account",), ("account",)),
    (("qos",), ("qos",)),
    (("gres", "generic resource", "gpus"), ("gpus_per_node", "gres")),
    (("memory", "mem "), ("mem_gb", "mem_per_gpu")),
    (("processors", "cpu", "node configuration", "nodes"), ("cpus_per_task", "tasks_per_node", "nodes")),
    (("time limit",), ("timeout_min",)),
)


def slurm_refusal(stderr: str) -> str:
    """One line for a submission sbatch refused: its reason, the hydra.launcher keys that
    ask for that resource, and what the cluster offers (sinfo), where sinfo answers."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reasons = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line] or lines[-1:] or ["?"]
    reason = reasons[0]
    lower = reason.lower()
    keys = [k for words, ks in SBATCH_CAUSES if any(w in lower for w in words) for k in ks]
    keys = keys or ["gpus_per_node", "cpus_per_task", "mem_gb", "partition", "timeout_min"]
    offers = cluster_offers()
    return (
        f"SLURM refused the sweep's jobs: {reason}; change "
        + ", ".join(f"hydra.launcher.{k}" for k in keys)
        + " (set in the launcher preset, conf/hydra/launcher/slurm.yaml or slurm_grouped.yaml)"
        + (f"; the cluster offers {offers}" if offers else "")
    )


def cluster_offers() -> str:
    """What `sinfo` says each partition offers per node, in a few words ('' if it cannot tell)."""
    import subprocess

    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P|%D|%c|%m|%G"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    parts = []
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) != 5:
            continue
        partition, nodes, cpus, mem, gres = fields
        gpus = "no GPUs" if gres in ("(null)", "") else f"gres {gres}"
        parts.append(f"partition {partition.rstrip('*')}: {nodes} node(s) of {cpus} CPUs, {mem} MB, {gpus}")
    return "; ".join(parts)


def run(main: Callable[[], Any]) -> None:
    """Call a @hydra.main function, reporting user errors in one line."""
    global DEBUG
    debug = DEBUG = "--debug" in sys.argv[1:] or os.environ.get("HYDRA_FULL_ERROR") == "1"
    sys.argv = [a for a in sys.argv if a != "--debug"]
    # Hydra takes `=3` for a config group with no name and fails with a bare ValueError.
    for arg in sys.argv[1:]:
        if "=" in arg and not arg.split("=", 1)[0].lstrip("+~"):
            print(f"error: cannot parse the override '{arg}': no key before '='. Form: key=value", file=sys.stderr)
            sys.exit(2)
    # Hydra prints its own errors and exits unless this is set; we want the exception.
    # Restored afterwards, so a later call in the same process is not taken for --debug.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (UserError, ConfigCompositionException, OverrideParseException) as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # A path that cannot be read or written (missing, read-only, not a directory, disk
        # full): say which, not where in Hydra or torch it surfaced.
        if debug or e.filename is None:
            raise
        print(
            f"error: '{e.filename}': {e.strerror} (for an output, choose another "
            "hydra.run.dir / hydra.sweep.dir or free space)",
            file=sys.stderr,
        )
        sys.exit(2)
    except Exception as e:
        # The cluster refused a SLURM sweep at submission (sbatch's own words inside).
        if debug or type(e).__name__ not in ("FailedJobError", "FailedSubmissionError"):
            raise
        print(f"error: {slurm_refusal(str(e))}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for the commands that are not Hydra apps: a bad argument is one `error:`
    line (exit 2), not argparse's usage block followed by its message."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def one_line(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        if e.options is not None:
            return (
                f"config group '{group}' has no option '{option}'"
                f"{did_you_mean(option, e.options)}; valid: {', '.join(sorted(e.options))}"
            )
        return f"config file '{e.missing_cfg_file}' not found"
    if isinstance(e, OverrideParseException):
        return (
            f"cannot parse the override '{e.override}': {e.message.splitlines()[0]}. Form: key=value, group=option, "
            "+new_key=value; quote values with spaces or brackets"
        )
    cause = e.__cause__
    first = str(e).splitlines()[0]
    if first.startswith("Could not override '") and isinstance(cause, OmegaConfBaseException):
        key = first.split("'")[1]
        if key.startswith("sae.") and key in known_keys():
            return f"config key '{key}': the chosen architecture has no such key; {architectures_with(key)}"
        if key.startswith("hydra.launcher."):
            # A launcher takes only its own settings: a leading + would not help a typo.
            return f"config key '{key}': not a setting of the launcher{did_you_mean(key, launcher_keys())}"
        same_depth = [k for k in known_keys() if k.count(".") == key.count(".")]
        return (
            f"config key '{key}': not in the config{did_you_mean(key, same_depth)}. "
            f"A new key needs a leading +, e.g. +{key}=..."
        )
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        # The schema refused an override as Hydra composed it: a wrong type or not a valid choice.
        from saesweep.config.schema import omegaconf_error

        return omegaconf_error(cause)
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def did_you_mean(name: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def architectures_with(key: str) -> str:
    """'architectures with it: a, b' for a key of some architectures' sae node."""
    from saesweep.sae import ARCHITECTURES

    name = key.removeprefix("sae.")
    having = [a for a, cls in ARCHITECTURES.items() if name in {f.name for f in dataclasses.fields(cls.config_class)}]
    return f"architectures with it: {', '.join(sorted(having))}"


def known_keys() -> list[str]:
    """Every dotted key of the training schema, the sae keys of every architecture included."""
    from saesweep.config import CONF_DIR
    from saesweep.config.schema import TrainConfig
    from saesweep.sae import ARCHITECTURES

    keys = list(_dotted(TrainConfig))
    for arch in ARCHITECTURES.values():
        keys += [f"sae.{f.name}" for f in dataclasses.fields(arch.config_class)]
    keys += [
        group.name for group in Path(CONF_DIR).iterdir() if group.is_dir() and not group.name.startswith("_")
    ]  # architecture, model, ...
    return sorted(set(keys))


def launcher_keys() -> list[str]:
    """The hydra.launcher keys of our launcher presets: their schemas' and their YAMLs'."""
    from omegaconf import OmegaConf

    from hydra_plugins.saesweep_slurm_grouped_launcher.slurm_grouped_launcher import SlurmGroupedConf
    from saesweep.config import CONF_DIR

    keys = {f"hydra.launcher.{f.name}" for f in dataclasses.fields(SlurmGroupedConf) if not f.name.startswith("_")}
    for preset in (Path(CONF_DIR) / "hydra" / "launcher").glob("*.yaml"):
        keys.update(f"hydra.launcher.{k}" for k in OmegaConf.load(preset) if not str(k).startswith("_"))
    return sorted(keys)


def _dotted(cls: type, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _dotted(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"
