"""`python -m saesweep.report SWEEP_DIR [--out DIR]`: rebuild a sweep's report.

Writes report.csv, report.md and pareto.png (see saesweep.sweep.report) into the sweep
dir or DIR. It reads only the member dirs, so it also works while members still run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saesweep.errors import UserError
from saesweep.sweep.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saesweep.report", description="Rebuild the report of a sweep.")
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="a Hydra multirun dir (members 0, 1, ...)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output dir (default: SWEEP_DIR)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.sweep_dir, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"error: cannot write the report to '{e.filename or args.out or args.sweep_dir}': {e.strerror}",
            file=sys.stderr,
        )
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
