"""Describe the machine a benchmark ran on, for the header of every result file."""

from __future__ import annotations

import datetime
import os
import platform
from concurrent.futures import ThreadPoolExecutor

import torch

from flexmoe.files import write_text_atomic


# FLEx's default recipe before 2026-12-02 (a full trainable copy of the expert at the shared lr, gate
# bias -4), as overrides of today's config: what benchmarks that compare with older commits, or
# with that recipe, pin
PREVIOUS_FLEX_RECIPE = ("flex.graft_train=full", "train.personal_lr=0", "flex.gate_init_bias=-4")


def describe() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }


def run_with_threads(threads: int, fn, *args):
    """`fn(*args)` with torch limited to `threads` intra-op threads, the previous count restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(previous)


def bench_jobs() -> int:
    """How many single-threaded runs a run-based benchmark starts at once (FLEXMOE_BENCH_JOBS, default 1).

    Each run is its own process on one torch thread, so on an otherwise idle 2-core machine two
    jobs finish a grid in about half the wall time; each run's own result does not change.
    """
    return positive_int_env("FLEXMOE_BENCH_JOBS", 1)


def positive_int_env(name: str, default: int) -> int:
    """The positive integer in environment variable `name` (`default` when unset); else a one-line exit."""
    text = os.environ.get(name, str(default))
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"{name} must be a positive integer, not {text!r}")
    return int(text)


def run_each(items, fn, jobs: int) -> list:
    """`[fn(item) for item in items]` with up to `jobs` calls at a time (each starts its own process)."""
    if jobs == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, items))


def write_result(results_dir, name: str, lines: list[str], echo: bool = True):
    """Write `results_dir/<name>-<date>.md` atomically (a temporary file renamed) and echo it."""
    text = "\n".join(lines).rstrip() + "\n"
    path = write_text_atomic(results_dir / f"{name}-{datetime.date.today().isoformat()}.md", text)
    print(text if echo else f"wrote {path}", end="" if echo else "\n")
    return path


def header_markdown(title: str, command: str) -> str:
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    lines += [f"- {k}: {v}" for k, v in describe().items()]
    return "\n".join(lines) + "\n"
