"""`runtime.workers`: the in-process engine's clients on worker processes give the metrics and
per-example files of one process, byte for byte; a client crashing in a worker is skipped for the
round as in one process; a `FlexmoeError` in a worker stops the run with its one line; no worker
outlives the run (also after an error or an interrupt); the Flower engine refuses the key.

Workers are spawned processes: a monkeypatch of this process does not reach them, so the runs
read their data from a file (not the patched builtin set) and faults are injected with
`Simulation(worker_setup=...)`, a function of this module each worker calls once built."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from flexmoe.engine.simulation import InProcess, Simulation
from flexmoe.errors import FlexmoeError

from helpers.engine import engine_config, metrics, synthetic_examples

CRASHING_CLIENT = 1


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workers-data") / "data.jsonl"
    path.write_text("".join(json.dumps(e.__dict__) + "\n" for e in synthetic_examples()))
    return path


def config(model_dir: str, data_path: Path, *overrides: str):
    return engine_config(model_dir, f'data.source="{data_path}"', "runtime.threads=1", *overrides)


def simulate(model_dir: str, data_path: Path, out: Path, *overrides: str, setup=None, **kwargs) -> dict:
    return Simulation(config(model_dir, data_path, *overrides), out, worker_setup=setup).run(**kwargs)


def files(run_dir: Path, under: str) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / under).rglob("*")) if p.is_file()}


def assert_no_workers() -> None:
    """No worker left: none of multiprocessing's children, and no other OS child process than
    multiprocessing's own helpers (the fork server workers start from, its resource tracker)."""
    assert multiprocessing.active_children() == []
    try:
        import psutil
    except ImportError:
        return
    from multiprocessing import forkserver, resource_tracker

    helpers = {getattr(forkserver._forkserver, "_forkserver_pid", None),
               getattr(resource_tracker._resource_tracker, "_pid", None)}
    assert [p for p in psutil.Process().children(recursive=True) if p.pid not in helpers] == []


# ---- worker-side faults (module-level: a spawned worker imports them by name) -----------------
def crashing(original):
    def train(self, client, round_index, received):
        if client.client_id == CRASHING_CLIENT:
            raise RuntimeError("disk on fire")
        return original(self, client, round_index, received)
    return train


def crash_one_client() -> None:
    """In a worker: client CRASHING_CLIENT's training raises, as a bug of its own would."""
    from flexmoe.engine.client import ClientRunner

    ClientRunner._train = crashing(ClientRunner._train)


def user_mistake() -> None:
    """In a worker: every training hits a user mistake."""
    from flexmoe.engine.client import ClientRunner

    def mistaken(self, client, round_index, received):
        raise FlexmoeError("data.source: line 3 is not valid JSON")

    ClientRunner._train = mistaken


def interrupt_main(flag: str, main_pid: int) -> None:
    """In a worker: the run's first training (of any worker) sends Ctrl-C to the main process,
    once; workers themselves ignore SIGINT."""
    import signal

    from flexmoe.engine.client import ClientRunner

    original = ClientRunner._train

    def interrupting(self, client, round_index, received):
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.kill(main_pid, signal.SIGINT)
        return original(self, client, round_index, received)

    ClientRunner._train = interrupting


# ---- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["flex", "fedper"])
def test_two_workers_give_the_metrics_and_detail_files_of_one_process(model_dir, data_path, tmp_path, method):
    overrides = (f"method={method}", "eval.knowledge=true", "eval.knowledge_max_docs=3",
                 "eval.knowledge_max_length=32", "eval.max_probes=8")
    one = simulate(model_dir, data_path, tmp_path / "one", *overrides)
    two = simulate(model_dir, data_path, tmp_path / "two", *overrides, "runtime.workers=2")
    assert_no_workers()
    assert (tmp_path / "one" / "metrics.jsonl").read_bytes() == (tmp_path / "two" / "metrics.jsonl").read_bytes()
    assert files(tmp_path / "one", "evals") == files(tmp_path / "two", "evals")
    assert files(tmp_path / "one", "evals")  # per-example files were written
    assert {k: v for k, v in one.items() if k not in ("wall_seconds", "phase_seconds")} == \
        {k: v for k, v in two.items() if k not in ("wall_seconds", "phase_seconds")}


def test_a_client_crash_in_a_worker_skips_it_as_one_process_does(model_dir, data_path, tmp_path, monkeypatch):
    from flexmoe.engine.client import ClientRunner

    simulate(model_dir, data_path, tmp_path / "two", "rounds=1", "runtime.workers=2", setup=crash_one_client)
    assert_no_workers()
    monkeypatch.setattr(ClientRunner, "_train", crashing(ClientRunner._train))  # the same fault, in one process
    simulate(model_dir, data_path, tmp_path / "one", "rounds=1")
    failures = [r for r in metrics(tmp_path / "two") if r["kind"] == "failure"]
    assert failures == [{"round": 1, "kind": "failure", "client": CRASHING_CLIENT, "error": "RuntimeError: disk on fire"}]
    assert [r["client"] for r in metrics(tmp_path / "two") if r["kind"] == "train"] == [2]  # round 1: clients 1, 2
    assert metrics(tmp_path / "two") == metrics(tmp_path / "one")


def test_a_flexmoe_error_in_a_worker_stops_the_run_with_its_line(model_dir, data_path, tmp_path):
    with pytest.raises(FlexmoeError) as raised:
        simulate(model_dir, data_path, tmp_path, "rounds=1", "runtime.workers=2", setup=user_mistake)
    assert str(raised.value) == "data.source: line 3 is not valid JSON"
    assert_no_workers()


def test_an_interrupt_ends_every_worker_and_the_run_resumes(model_dir, data_path, tmp_path):
    import signal

    # Ctrl-C raises KeyboardInterrupt here as in a terminal, also in a pytest-xdist worker (which ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            simulate(model_dir, data_path, tmp_path / "cut", "runtime.workers=2",
                     setup=functools.partial(interrupt_main, str(tmp_path / "interrupted"), os.getpid()))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert_no_workers()
    Simulation.resume(tmp_path / "cut")  # the resolved config says workers = 2
    assert_no_workers()
    simulate(model_dir, data_path, tmp_path / "full")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_workers_are_the_in_process_engines_own(model_dir, data_path):
    from flexmoe.engine.flower.server_app import refuse_in_flower

    with pytest.raises(FlexmoeError, match=r"^runtime\.workers = 2: .*SuperNode"):
        refuse_in_flower(config(model_dir, data_path, "runtime.workers=2"))
    refuse_in_flower(config(model_dir, data_path))
    with pytest.raises(FlexmoeError, match="runtime.workers"):
        config(model_dir, data_path, "runtime.workers=0")
    assert InProcess.__init__.__defaults__ == (None,)  # workers = 1: no pool, the one-process code path


def test_a_client_goes_back_to_its_worker_while_the_loads_stay_balanced():
    from flexmoe.engine.workers import WorkerPool

    pool = WorkerPool.__new__(WorkerPool)  # the scheduling alone, no process
    pool._queues, pool._owner = [None, None], {}
    assert pool._assign([0, 1, 2, 3]) == [0, 1, 0, 1]  # round 0
    assert pool._assign([0, 1, 2, 3]) == [0, 1, 0, 1]  # every later task: the same worker, no re-tokenising
    assert pool._assign([0, 2]) == [0, 1]  # both ran on worker 0: one moves, so both workers work
    assert pool._assign([3]) == [1]
