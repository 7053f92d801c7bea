"""Training curves from a run's metrics.jsonl: what the HTML reports plot against tokens.

metrics.jsonl has one JSON object per logging step (see saesweep.training.member):
step, tokens, lr, loss and `loss/<term>`, l0, explained_variance, dead_features,
tokens_per_second. A run killed mid-write can leave a last line cut short; lines that do
not parse as an object with a numeric `tokens` are skipped, not fatal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Quantities plotted against tokens, in page order; loss terms (`loss/<term>`) go after
# `loss`, in the order the runs log them. The title says what each one is.
QUANTITIES = {
    "loss": "total loss (training batch)",
    "l0": "L0 (mean active latents per token, training batch)",
    "explained_variance": "explained variance (training batch)",
    "dead_features": "dead latents (silent for training.dead_after_tokens)",
    "lr": "learning rate",
}
# A very long run logs hundreds of thousands of lines; a page needs no more points than
# a screen has pixels across.
MAX_POINTS = 2000


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (empty when absent or unreadable), in file order."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _number(record.get("tokens")) is not None:
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    """A finite int or float as float; None for anything else (bool, str, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def quantities(records_by_run: list[list[dict[str, Any]]]) -> list[str]:
    """The quantities any run logged, in QUANTITIES order with the loss terms after `loss`."""
    logged = list(dict.fromkeys(k for records in records_by_run for r in records for k in r))
    terms = [k for k in logged if k.startswith("loss/")]
    ordered = []
    for name in QUANTITIES:
        if name in logged:
            ordered.append(name)
        if name == "loss":
            ordered.extend(terms)
    return ordered


def title(quantity: str) -> str:
    if quantity.startswith("loss/"):
        return f"loss term {quantity.removeprefix('loss/')} (training batch)"
    return QUANTITIES.get(quantity, quantity)


def stride(n: int, max_points: int = MAX_POINTS) -> int:
    """Every how many records a curve keeps so that it has at most max_points."""
    return max(1, math.ceil(n / max_points))


def series(records: list[dict[str, Any]], quantity: str, max_points: int = MAX_POINTS) -> tuple[list, list]:
    """(tokens, values) of one quantity: every `stride`-th record that has it, and the last.

    Non-finite values (a skipped step's NaN loss) are dropped: a line cannot show them.
    """
    points = [(_number(r["tokens"]), _number(r.get(quantity))) for r in records]
    points = [(x, y) for x, y in points if x is not None and y is not None]
    step = stride(len(points), max_points)
    kept = points[::step]
    if points and (len(points) - 1) % step:
        kept.append(points[-1])
    return [_plain(x) for x, _ in kept], [_plain(y) for _, y in kept]


def _plain(v: float) -> int | float:
    """Counts as ints, so the page shows 8192, not 8192.0."""
    return int(v) if v.is_integer() and abs(v) < 2**53 else v
