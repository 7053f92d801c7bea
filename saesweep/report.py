"""`python -m saesweep.report DIR [--out OUT]`: rebuild the report of a sweep, or the page of a run.

A sweep dir (member subdirectories 0, 1, ...) gets report.csv, report.md, pareto.png
and report.html (see saesweep.sweep.report); a single run's dir (its metrics.jsonl,
.hydra/ or eval.json, and no members) gets run.html. Into DIR, or OUT. It reads only
the run dirs, so it also works while members still run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from saesweep.cli import OneLineArgumentParser
from saesweep.errors import UserError
from saesweep.sweep.members import is_run_dir
from saesweep.sweep.report import write_report
from saesweep.sweep.report_html import REPORT_NAME, write_run_html


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="python -m saesweep.report", description="Rebuild the report of a sweep, or the page of a single run."
    )
    parser.add_argument(
        "sweep_dir", type=Path, metavar="DIR", help="a Hydra multirun dir (members 0, 1, ...) or a single run's dir"
    )
    parser.add_argument("--out", type=Path, default=None, metavar="OUT", help="output dir (default: DIR)")
    args = parser.parse_args(argv)
    try:
        if is_run_dir(args.sweep_dir):
            paths = [write_run_html(args.sweep_dir, args.out)]
        else:
            md = write_report(args.sweep_dir, args.out)
            paths = [md, md.with_name(REPORT_NAME)]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"error: cannot write the report to '{e.filename or args.out or args.sweep_dir}': {e.strerror}",
            file=sys.stderr,
        )
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
