"""benchmarks/bench_realshape.py measures each command's own peak RSS: a child forked from a large
process does not inherit its peak (ru_maxrss would: Linux folds the forking parent's RSS into it)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's /proc")
def test_a_child_peak_is_its_own_not_the_parents():
    from benchmarks.bench_realshape import measured

    held = torch.ones(96 * 2**20)  # 384 MiB resident in this process
    result = measured(["timeit", "-n", "1", "pass"])
    own = result["peak_rss"]
    assert 5 * 2**20 < own < held.nbytes  # a bare interpreter: far below what its parent holds
    inherited = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert inherited >= held.nbytes > own  # what the bench used to report
