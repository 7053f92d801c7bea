"""The members of a sweep: what each one is, how it ended, how they differ.

A member is a numerically named subdirectory of the sweep dir (Hydra's default
`hydra.sweep.subdir`); a single run's dir is read the same way. Its status:
  done        eval.json is present and holds a JSON object;
  failed      eval.json is present but unreadable; or status.json has
              `"status": "failed"` (the report callback writes one when a job raises,
              since Hydra records the exception nowhere in the member dir); or a `*.log`
              in the member dir has a `Traceback (most recent call last)` line, an
              `[ERROR]`/`[CRITICAL]` log record, or a line starting with `error:`;
  running     anything else that has started: metrics.jsonl, checkpoint.pt or a non-empty
              log (training, queued again after a preemption, or killed without a trace);
  pending     nothing written yet: a member dir without any of those, or a member that
              hydra/launcher=slurm_grouped planned (slurm_grouped_plan.json) and whose job
              has not started, so it has no dir at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from saesweep.errors import UserError

METRICS = ("l0", "explained_variance", "mse", "dead_fraction", "ce_loss_score", "tokens_trained", "tokens_per_second")
# How the reports show each metric (report.csv keeps full precision).
METRIC_FORMAT = {
    "l0": ".1f",
    "explained_variance": ".4f",
    "mse": ".4g",
    "dead_fraction": ".3f",
    "ce_loss_score": ".4f",
    "tokens_trained": ",.0f",
    "tokens_per_second": ",.0f",
}
# Hydra's log format is "[time][logger][LEVEL] - message"; `error:` is our UserError line.
# A bare "error" anywhere would also match messages such as "mean squared error".
FAILURE_LINE = re.compile(r"Traceback \(most recent call last\)|\]\[(ERROR|CRITICAL)\] - |^error:", re.MULTILINE)


@dataclass
class MemberResult:
    name: str
    path: Path
    status: str  # done | failed | running | pending
    reason: str = ""
    # None when .hydra/overrides.yaml is absent or unreadable: unknown, not empty.
    overrides: dict[str, str] | None = None
    architecture: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return int(self.name)


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """`["sae.k=16", "+x=1", "~y"]` -> `{"sae.k": "16", "x": "1", "y": "<deleted>"}`."""
    result = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        # "+key", "++key" and "key" set the same key; "~key" deletes it.
        result[key.lstrip("+~")] = value if sep else "<deleted>"
    return result


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _architecture(member_dir: Path) -> str | None:
    cfg = read_yaml(member_dir / ".hydra" / "config.yaml")
    sae = cfg.get("sae") if isinstance(cfg, dict) else None
    arch = sae.get("architecture") if isinstance(sae, dict) else None
    if arch is None:
        # Without .hydra the exported SAE still records what it was trained as.
        try:
            arch = json.loads((member_dir / "sae" / "cfg.json").read_text())["metadata"]["training_architecture"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return str(arch)


def _failure_reason(member_dir: Path) -> str | None:
    """Why a member without eval.json failed, or None when nothing says it did."""
    try:
        status = json.loads((member_dir / "status.json").read_text())
    except (OSError, ValueError):
        status = None
    if isinstance(status, dict) and status.get("status") == "failed":
        return f"status.json: {status.get('error') or 'failed'}"
    for log_file in sorted(member_dir.glob("*.log")):
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            continue
        if match := FAILURE_LINE.search(text):
            lines = text[text.rfind("\n", 0, match.start()) + 1 :].splitlines()
            line = lines[0]
            if match.group().startswith("Traceback"):
                # The exception is the first unindented line after the (indented) frames.
                line = next((x for x in lines[1:] if x.strip() and not x[0].isspace()), line)
            return f"{log_file.name}: {line.strip()[:200]}"
    return None


STATUSES = ("done", "failed", "running", "pending")

# What a run leaves in its dir: a refused rerun writes nothing next to them.
RUN_FILES = ("eval.json", "checkpoint.pt", "metrics.jsonl")


def _overrides(member_dir: Path) -> list[str] | None:
    """The member's overrides: its .hydra/ record, or status.json for a job refused before it started."""
    recorded = read_yaml(member_dir / ".hydra" / "overrides.yaml")
    if isinstance(recorded, list):
        return recorded
    try:
        status = json.loads((member_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    overrides = status.get("overrides") if isinstance(status, dict) else None
    return overrides if isinstance(overrides, list) else None


def load_member(member_dir: Path) -> MemberResult:
    overrides_list = _overrides(member_dir)
    member = MemberResult(
        name=member_dir.name,
        path=member_dir,
        status="pending",
        overrides=parse_overrides(overrides_list) if isinstance(overrides_list, list) else None,
        architecture=_architecture(member_dir),
    )
    eval_path = member_dir / "eval.json"
    if eval_path.exists():
        try:
            result = json.loads(eval_path.read_text())
            if not isinstance(result, dict):
                raise ValueError(f"holds a {type(result).__name__}, not an object")
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            member.status, member.reason = "failed", f"eval.json unreadable: {e}"
        else:
            member.status = "done"
            member.metrics = {
                k: float(result[k])
                for k in METRICS
                if isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)
            }
    elif (reason := _failure_reason(member_dir)) is not None:
        member.status, member.reason = "failed", reason
    elif _started(member_dir):
        member.status = "running"
    return member


def _started(member_dir: Path) -> bool:
    if any((member_dir / name).exists() for name in RUN_FILES):
        return True
    try:
        return any(log.stat().st_size > 0 for log in member_dir.glob("*.log"))
    except OSError:
        return False


def _planned(sweep_dir: Path) -> dict[str, list[str] | None]:
    """Member name -> overrides, of the members slurm_grouped_plan.json lists ({} without one)."""
    from saesweep.sweep.jobs import PLAN_NAME

    try:
        plan = json.loads((sweep_dir / PLAN_NAME).read_text())
        entries = plan["members"]
        return {
            str(int(e["member"])): list(e["overrides"]) if isinstance(e.get("overrides"), list) else None
            for e in entries
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def load_sweep(sweep_dir: Path) -> list[MemberResult]:
    """Every member of the sweep, by member number. UserError if there are none."""
    sweep_dir = Path(sweep_dir)
    expected = "a Hydra multirun directory with member subdirectories 0, 1, 2, ..."
    if not sweep_dir.exists():
        raise UserError(f"sweep directory '{sweep_dir}' does not exist; expected {expected}")
    if not sweep_dir.is_dir():
        raise UserError(f"'{sweep_dir}' is not a directory; expected {expected}")
    member_dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    members = [load_member(p) for p in member_dirs]
    # Planned members whose job has not started yet have no dir.
    names = {p.name for p in member_dirs}
    for name, overrides in _planned(sweep_dir).items():
        if name not in names:
            parsed = parse_overrides(overrides) if overrides is not None else None
            members.append(MemberResult(name, sweep_dir / name, "pending", "job not started", parsed))
    if not members:
        raise UserError(f"'{sweep_dir}' has no member subdirectories; expected {expected}")
    return sorted(members, key=lambda m: m.number)


def differing_overrides(overrides: list[dict[str, str] | None]) -> list[str]:
    """Override keys whose value is not the same in every member (absent counts as a value).

    Members whose overrides are None (no .hydra/overrides.yaml) are left out: unknown.
    """
    known = [o for o in overrides if o is not None]
    keys = list(dict.fromkeys(k for o in known for k in o))
    return [k for k in keys if len({o.get(k) for o in known}) > 1]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (minimise x, maximise y), by increasing x.

    Equal points do not dominate each other, so duplicates on the front are all kept.
    A NaN compares false both ways and would always be kept: drop non-finite points first.
    """

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def summary(members: list[MemberResult]) -> str:
    counts = {s: sum(m.status == s for m in members) for s in STATUSES}
    return f"{len(members)} members: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)


def is_run_dir(path: Path) -> bool:
    """A single run's dir: something a run writes, and no member subdirectories."""
    path = Path(path)
    if not path.is_dir() or any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
        return False
    return any((path / name).exists() for name in ("metrics.jsonl", "eval.json", ".hydra"))
