"""The benchmarks' parallel run helper: order kept, calls really concurrent, bad settings refused."""

import threading

import pytest

from benchmarks.machine import bench_jobs, run_each


def test_run_each_keeps_order_and_runs_jobs_at_once():
    both_started = threading.Barrier(2, timeout=10)  # breaks (raises) unless two calls overlap

    def call(item):
        both_started.wait()
        return item * 10

    assert run_each([1, 2, 3, 4], call, jobs=2) == [10, 20, 30, 40]


def test_run_each_with_one_job_is_sequential():
    seen = []
    assert run_each("abc", lambda item: seen.append(item) or item.upper(), jobs=1) == ["A", "B", "C"]
    assert seen == ["a", "b", "c"]


@pytest.mark.parametrize("text", ["0", "-1", "two", ""])
def test_bench_jobs_refuses_non_positive_counts(monkeypatch, text):
    monkeypatch.setenv("FLEXMOE_BENCH_JOBS", text)
    with pytest.raises(SystemExit, match="FLEXMOE_BENCH_JOBS must be a positive integer"):
        bench_jobs()


def test_bench_jobs_defaults_to_one(monkeypatch):
    monkeypatch.delenv("FLEXMOE_BENCH_JOBS", raising=False)
    assert bench_jobs() == 1
    monkeypatch.setenv("FLEXMOE_BENCH_JOBS", "2")
    assert bench_jobs() == 2
