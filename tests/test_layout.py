"""The package's shape: no import cycles, commands apart from the library, every package
shipped in the wheel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "saesweep"

# python -m saesweep.NAME; the library lives in the subpackages.
COMMANDS = {"train", "evaluate", "cache", "report", "pretokenize", "upload", "features"}
# Small modules the commands (cli) or the commands and the library (errors, atomic) share.
SHARED = {"cli", "errors", "atomic"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The saesweep modules `path` imports, at any depth of the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from saesweep.x import y` imports x, or the module x.y
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_saesweep():
    """A module's imports, lazy ones included, never lead back to it (a package's
    __init__ counts as the package)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_top_level_modules_are_the_commands_and_the_shared_helpers():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == COMMANDS | SHARED


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_library_module_imports_a_command(name):
    importers = sorted(m for m, deps in import_graph().items() if f"saesweep.{name}" in deps)
    assert importers == []


def test_the_wheel_lists_every_package():
    """pyproject.toml lists packages by hand (conf/ is mapped in as saesweep.conf)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p) for p in [*PACKAGE.rglob("__init__.py"), *(REPO / "hydra_plugins").rglob("__init__.py")]}
    assert listed == on_disk | {"saesweep.conf", "hydra_plugins"}  # hydra_plugins: a namespace package
