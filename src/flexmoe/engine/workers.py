"""Worker processes of the in-process engine (`runtime.workers` > 1).

Each worker is a fresh process (multiprocessing's fork server, else "spawn": never a fork of a
process whose torch threads already exist) that builds the client side exactly as `Simulation.run` does
(`engine/local_clients.py`): the method, the model and tokenizer, the `ClientPool` and a `ClientRunner`
on the run directory's client store, with `runtime.threads` torch threads of its own. It then serves tasks, each one
whole client (round 0's base evaluation or graft, a round's training, an evaluation), from a
queue of its own: the main process gives a client to the worker that ran it before (which keeps
its tokenised data) while the workers' loads stay balanced (`WorkerPool._assign`). Tensors travel as
safetensors bytes (`flexmoe.wire`); client state travels through `clients/<id>/` on disk as
in the one-process engine (pending state, committed by the main process), so a client's
result does not depend on which worker ran it, and `WorkerPool.map` returns the results in the
order of its tasks: a run's metrics are those of `runtime.workers = 1`.

A task's outcome comes back as ("ok", value), ("failed", one line) for an exception of the
client's own (the caller decides: a training failure skips the client for the round), or
("error", message) for a `FlexmoeError`, which the caller re-raises as one. Workers relay
their progress events and flexmoe log records to the main process's `Progress`. A worker
that dies, or fails to start, stops the run; `close` ends every worker (also on an error or a
KeyboardInterrupt: workers ignore SIGINT, the main process ends them), and a worker whose
parent is gone exits by itself.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import queue
import signal
import traceback
from collections.abc import Callable
from pathlib import Path

from flexmoe.config import RunConfig
from flexmoe.engine.local_clients import build_local_clients, decode, train_client
from flexmoe.engine.model import use_threads
from flexmoe.engine.progress import Progress, logs_to
from flexmoe.engine.server import failure_reason
from flexmoe.errors import FlexmoeError
from flexmoe.methods.build import build_method

__all__ = ["WorkerPool", "WorkerFailed"]

# Workers start from multiprocessing's fork server, which imports torch, transformers and flexmoe
# once (`PRELOAD`) and forks each worker from that single-threaded state, so a run's workers do
# not pay the imports again (seconds of CPU each); never a fork of a process whose torch threads
# exist. Where there is no fork server, workers are spawned.
CONTEXT = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
PRELOAD = ["flexmoe.engine.simulation"]
POLL_SECONDS = 0.5  # how often a waiting side checks that the other side is still alive


class WorkerFailed(RuntimeError):
    """A task failed in a worker where the one-process engine would have raised (round 0, an
    evaluation): the worker's one-line reason; its traceback is this error's cause."""


class RemoteTraceback(Exception):
    def __init__(self, text: str):
        super().__init__(text)

    def __str__(self) -> str:
        return self.args[0]


class _Relay(Progress):
    """A worker's progress: every event sent to the main process's `Progress`."""

    def __init__(self, results):
        self.results = results

    def _send(self, name: str, *args) -> None:
        self.results.put(("progress", name, args))

    def client_started(self, client_id: int, steps: int) -> None:
        self._send("client_started", client_id, steps)

    def step(self, step: int, steps: int, loss: float) -> None:
        self._send("step", step, steps, loss)

    def client_done(self, client_id: int, loss: float) -> None:
        self._send("client_done", client_id, loss)

    def message(self, text: str) -> None:
        self._send("message", text)


class ClientSide:
    """One worker's client side, built as `Simulation.run` builds it; one method per task kind.
    Every task returns (its value, the client's truncation counts for the report)."""

    def __init__(self, config: RunConfig, run_dir: Path, progress: Progress):
        use_threads(config)
        self.config = config
        self.method = build_method(config)
        side = build_local_clients(config, self.method, run_dir, progress)
        self.clients, self.runner = side.clients, side.runner
        self._round: int | None = None

    def _client(self, client_id: int):
        client = self.clients.get(client_id)
        return client, client.truncation

    def base(self, client_id: int):
        client, truncation = self._client(client_id)
        return self.runner.evaluate_base(client), truncation

    def graft(self, client_id: int):
        client, truncation = self._client(client_id)
        self.runner.ensure_grafted(client)
        return None, truncation

    def train(self, client_id: int, round_index: int, sampled: list[int], down_blob: bytes | None):
        if round_index != self._round:  # keep the round's clients tokenised, as the main process would
            self.clients.start_round(sampled)
            self._round = round_index
        client, truncation = self._client(client_id)
        return train_client(self.runner, self.method, client, round_index, down_blob), truncation

    def evaluate(self, client_id: int, round_index: int, received_blob: bytes, global_blob: bytes | None,
                 base_load: dict | None):
        client, truncation = self._client(client_id)
        return self.runner.evaluate(client, round_index, decode(received_blob), base_load, decode(global_blob)), truncation


def _serve(config: RunConfig, run_dir: str, tasks, results, setup: Callable[[], None] | None) -> None:
    """A worker process's life: build the client side, then serve tasks until told to stop
    (None) or until its parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process ends us
    # as `flexmoe.cli.main`: bitsandbytes' import-time warning about an optional kernel package, not shown
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    relay = _Relay(results)
    try:
        side = ClientSide(config, Path(run_dir), relay)
        if setup is not None:
            setup()
    except BaseException as error:  # noqa: BLE001 - told to the main process, which stops the run
        kind = "error" if isinstance(error, FlexmoeError) else "failed"
        results.put(("dead", None, (kind, _reason(error), traceback.format_exc())))
        return
    parent = multiprocessing.parent_process()
    logging.getLogger("flexmoe").propagate = False  # shown once, by the main process, not also by a root handler here
    with logs_to(relay):  # the client side's log lines (truncation, failures) shown by the main process
        while True:
            try:
                task = tasks.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if task is None:
                return
            number, kind, args = task
            try:
                outcome = ("ok", getattr(side, kind)(*args))
            except FlexmoeError as error:  # a user mistake: the main process stops the run with its line
                outcome = ("error", (str(error), None))
            except Exception as error:  # noqa: BLE001 - one client's crash, reported as the engine reports it
                outcome = ("failed", (failure_reason(error), traceback.format_exc()))
            results.put(("done", number, outcome))


def _reason(error: BaseException) -> str:
    return str(error) if isinstance(error, FlexmoeError) else failure_reason(error)


class WorkerPool:
    """`count` worker processes, each serving its own task queue; started at once (they load their model
    while the main process sets the run up), ended by `close`."""

    def __init__(self, config: RunConfig, run_dir: Path, count: int, progress: Progress | None = None,
                 setup: Callable[[], None] | None = None):
        context = multiprocessing.get_context(CONTEXT)
        if CONTEXT == "forkserver":
            context.set_forkserver_preload(PRELOAD)  # takes effect when the fork server starts
        self.progress = progress or Progress()
        self._queues = [context.Queue() for _ in range(count)]  # one per worker: tasks go to a chosen worker
        self._owner: dict[int, int] = {}  # client id -> the worker that last ran it (it holds its tokens)
        self._results = context.Queue()
        self._next = 0
        self._busy = False  # tasks are out: `close` terminates at once (an error or an interrupt mid-map)
        self._processes = [
            context.Process(target=_serve, args=(config, str(run_dir), self._queues[i], self._results, setup),
                            name=f"flexmoe-worker-{i}", daemon=True)
            for i in range(count)
        ]
        try:
            for process in self._processes:
                process.start()
        except BaseException:
            self.close()
            raise

    def map(self, kind: str, tasks: list[tuple]) -> list[tuple[str, object]]:
        """Run `ClientSide.<kind>(*args)` for each args of `tasks` on the workers -> each task's
        (status, value) in the order of `tasks`: ("ok", value), ("failed", (reason, traceback)),
        ("error", (message, None))."""
        first = self._next
        self._next += len(tasks)
        self._busy = True
        for offset, (args, worker) in enumerate(zip(tasks, self._assign([args[0] for args in tasks]))):
            self._queues[worker].put((first + offset, kind, args))
        outcomes: dict[int, tuple] = {}
        while len(outcomes) < len(tasks):
            try:
                message = self._results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                self._check_alive()
                continue
            self._handle(message, first, len(tasks), outcomes)
        self._busy = False
        return [outcomes[i] for i in range(len(tasks))]

    def _assign(self, client_ids: list[int]) -> list[int]:
        """The worker of each task (whose first argument is its client id): a client goes back to the
        worker that ran it last (which keeps it tokenised, `ClientPool`), as long as that worker has
        no more than its share of the tasks; the others go to the least loaded worker. Balanced and
        deterministic; results do not depend on it."""
        share = math.ceil(len(client_ids) / len(self._queues))
        load, chosen = [0] * len(self._queues), [None] * len(client_ids)
        for i, cid in enumerate(client_ids):
            owner = self._owner.get(cid)
            if owner is not None and load[owner] < share:
                chosen[i], load[owner] = owner, load[owner] + 1
        for i, cid in enumerate(client_ids):
            if chosen[i] is None:
                worker = min(range(len(load)), key=load.__getitem__)
                chosen[i], load[worker] = worker, load[worker] + 1
            self._owner[cid] = chosen[i]
        return chosen

    def _handle(self, message: tuple, first: int, count: int, outcomes: dict) -> None:
        tag, key, value = message
        if tag == "progress":
            getattr(self.progress, key)(*value)
        elif tag == "dead":
            status, reason, text = value
            if status == "error":
                raise FlexmoeError(reason)
            raise WorkerFailed(f"a worker process could not start: {reason}") from RemoteTraceback(text)
        elif first <= key < first + count:
            outcomes[key - first] = value

    def _check_alive(self) -> None:
        dead = next((p for p in self._processes if not p.is_alive()), None)
        if dead is None:
            return
        try:  # a worker that could not start said why before it exited
            while True:
                self._handle(self._results.get(timeout=POLL_SECONDS), 0, 0, {})
        except queue.Empty:
            pass
        raise FlexmoeError(
            f"runtime.workers: worker process {dead.name} exited (code {dead.exitcode}) in the middle of the run; "
            "it stops at its last checkpoint (continue it with --resume). Each worker holds a copy of the model: "
            "fewer workers need less memory")

    def close(self) -> None:
        """End every worker: after the last task each one stops when told; while tasks are out (an
        error, an interrupt) they are terminated at once."""
        if not self._busy:
            for process, tasks in zip(self._processes, self._queues):
                if process.is_alive():
                    tasks.put(None)
        for process in self._processes:
            if process.pid is None:
                continue
            if not self._busy:
                process.join(timeout=10.0)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in (*self._queues, self._results):
            channel.close()
            channel.cancel_join_thread()
        self._processes = []
