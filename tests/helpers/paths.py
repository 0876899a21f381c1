"""Where things are: the repository root, computed once, for the tests that read its files
(configs/, docs/, benchmarks/, src/) whatever subfolder of tests/ they live in."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # tests/helpers/paths.py -> the repository
TESTS = REPO_ROOT / "tests"
