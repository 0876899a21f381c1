"""`flexmoe bench [NAME ...]`: run the benchmarks of a flexmoe source checkout.

The benchmarks (`benchmarks/bench_<name>.py`, results under `benchmarks/results/`) live in the
repository, not in the installed package, so the command needs a checkout: `--root DIR`, else
the current directory, else the checkout an editable install points at. It runs them exactly
as `python -m benchmarks [NAME ...]` (`make bench`) does, in a child process from the checkout:
no names = every benchmark except those run by name only (the hours-long fidelity study).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from flexmoe.errors import FlexmoeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (bench_NAME.py); default: all")
    parser.add_argument("--root", metavar="DIR", help="the flexmoe source checkout (default: the current directory)")
    parser.add_argument("--list", action="store_true", help="list the available benchmarks and exit")


def run(args: argparse.Namespace) -> int:
    root = checkout(args.root)
    available = benchmark_names(root)
    if args.list:
        print("\n".join(available))
        return 0
    unknown = [name for name in args.names if name not in available]
    if unknown:
        raise FlexmoeError(f"unknown benchmark {unknown[0]!r}; available: {', '.join(available)}")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args.names], cwd=root, check=False).returncode


def checkout(root: str | None) -> Path:
    """The source checkout holding `benchmarks/`."""
    if root is not None:
        candidates = [Path(root)]
    else:
        import flexmoe

        candidates = [Path.cwd(), Path(flexmoe.__file__).resolve().parents[2]]  # <checkout>/src/flexmoe/__init__.py
    for candidate in candidates:
        if (candidate / "benchmarks" / "__main__.py").is_file():
            return candidate.resolve()
    raise FlexmoeError(f"no benchmarks/ in {candidates[0]}: `flexmoe bench` runs from a flexmoe source checkout "
                       "(cd into it or pass --root DIR)")


def benchmark_names(root: Path) -> list[str]:
    return sorted(path.stem.removeprefix("bench_") for path in (root / "benchmarks").glob("bench_*.py"))
