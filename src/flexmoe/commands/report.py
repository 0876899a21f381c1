"""`flexmoe report DIR...`: rebuild reports from run directories alone.

One run directory: its own `report.md` and `plots/` are rewritten. Several, or a directory
holding runs (e.g. a `flexmoe compare` output): a comparison by method over seeds is written
to `--output-dir` (default: the single directory given).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexmoe.errors import FlexmoeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or directories holding runs")
    parser.add_argument("--output-dir", metavar="DIR", help="where a comparison report goes")


def run(args: argparse.Namespace) -> int:
    from flexmoe.report import find_runs, write_compare_report, write_run_report

    dirs = [Path(d) for d in args.dirs]
    runs = find_runs(dirs)
    if len(runs) == 1 and runs[0] == dirs[0] and not args.output_dir:
        print(f"report: {write_run_report(runs[0])}")
        return 0
    if args.output_dir is None and len(dirs) > 1:
        raise FlexmoeError("several directories: say where the comparison goes with --output-dir")
    out = Path(args.output_dir) if args.output_dir else dirs[0]
    for run_dir in runs:
        write_run_report(run_dir)
    print(f"report: {write_compare_report(runs, out)}")
    return 0
