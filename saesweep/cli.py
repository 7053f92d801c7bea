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


def run(main: Callable[[], Any]) -> None:
    """Call a @hydra.main function, reporting user errors in one line."""
    global DEBUG
    debug = DEBUG = "--debug" in sys.argv[1:] or os.environ.get("HYDRA_FULL_ERROR") == "1"
    sys.argv = [a for a in sys.argv if a != "--debug"]
    # Hydra prints its own errors and exits unless this is set; we want the exception.
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
        same_depth = [k for k in known_keys() if k.count(".") == key.count(".")]
        return (
            f"config key '{key}': not in the config{did_you_mean(key, same_depth)}. "
            f"A new key needs a leading +, e.g. +{key}=..."
        )
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def did_you_mean(name: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


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


def _dotted(cls: type, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _dotted(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"
