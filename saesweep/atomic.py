"""Atomic writes: a crash leaves the old file or the new one, never half of one.

Every file or directory saesweep writes that a crash could leave half-written goes
through here: checkpoints, eval.json, metrics rewrites, cache shards and manifests,
exported SAEs, converted models, pretokenized datasets, reports. Each is written under
a temp name beside its target and renamed over it.

Kept free of heavy imports (torch) so that light CLIs such as the sweep report can
use it without seconds of start-up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

Writer = Callable[[Path], None]


def atomic_write(path: Path, write: Writer) -> None:
    """Call write(tmp) on a temp file next to path, fsync it, then rename it over path."""
    atomic_write_many({Path(path): write})


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_many(writes: dict[Path, Writer]) -> None:
    """Write several files as one step: every temp file is complete (and fsynced) before
    the first rename, so a crash while writing leaves every previous file. Only a crash
    between the renames (microseconds) leaves some old and some new."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append((Path(tmp), path))
            write(Path(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; run outputs are for everyone who can see the run
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


def stale_temps(path: Path) -> list[Path]:
    """Temp files that interrupted atomic writes of `path` left behind."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


@contextmanager
def staged_dir(target: Path, replace: bool = True) -> Iterator[Path]:
    """An empty directory beside `target` to fill; when the block ends without an error it
    becomes `target`. An existing `target` is replaced if `replace`; otherwise, or if
    another process renamed its own copy in first, the staged copy is dropped and the
    existing one kept (for caches that any process may build: theirs is as good as ours).
    On an error the staged copy is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        # mkdtemp makes the directory 0700: outputs are for everyone who can see them.
        staging.chmod(0o755)
        if target.exists() and replace:
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        elif not target.exists():
            try:
                staging.rename(target)
            except OSError:
                if not target.exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
