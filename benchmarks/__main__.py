"""Run every benchmark module (`benchmarks/bench_*.py`) and write results under benchmarks/results/.

Each module exposes `main(results_dir: pathlib.Path) -> None` and writes its own result
file (markdown or JSON) named after itself and the date, with the machine described.
`python -m benchmarks NAME ...` runs only the named ones (e.g. `selection`). With no names it
runs all but the fidelity study (dozens of runs, hours), the speed study, the real-width shapes
(multi-GB checkpoints) and the attack / compressed-message study (16 runs), which run by name.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BY_NAME_ONLY = {"fidelity", "speed", "realshape", "recipe", "attacks"}  # hours / tens of minutes: run by name


def main(argv: list[str]) -> int:
    here = pathlib.Path(__file__).resolve().parent
    names = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    chosen = argv or [name for name in names if name not in BY_NAME_ONLY]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"benchmarks: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    for name in chosen:
        print(f"== benchmark {name}", flush=True)
        importlib.import_module(f"benchmarks.bench_{name}").main(RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
