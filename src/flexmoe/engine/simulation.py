"""In-process federated simulation: the round driver (`engine/driver.py`) over an in-process transport.

The frozen base is loaded once; one model instance serves every client in turn (and the driver):
before a client trains, its shared weights (what the method says it starts from), its personal
state (FLEx graft and gate) and its optimiser state are loaded into that instance, and afterwards
written back under `clients/<id>/`. Messages between server and clients are real safetensors
bytes (`flexmoe.wire`), which is what communication accounting counts.

Every random choice derives from (seed, round, client), and every round ends with an atomic
checkpoint, so a resumed run continues a killed one to exactly the metrics of an uninterrupted one.
A client that raises is skipped for the round (logged, its pending state dropped); a user
mistake (`FlexmoeError`) stops the run with its one line.

With `runtime.workers` = N > 1 the clients run on N worker processes instead (`engine/workers.py`),
each with its own model instance built the same way: a round's clients are handed out one by one,
their results gathered back in client order, so the run's metrics are those of one process. The
server, the base reference and the global model's measures stay in this process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flexmoe.config import RunConfig, load_config
from flexmoe.clients import Client, ClientInfo, ClientPool
from flexmoe.engine.client import ClientRunner
from flexmoe.engine.driver import RoundDriver, evaluated_clients
from flexmoe.engine.local_clients import build_local_clients, encode, reply_of, train_client
from flexmoe.engine.progress import Progress
from flexmoe.engine.server import failure_reason
from flexmoe.engine.workers import RemoteTraceback, WorkerFailed, WorkerPool
from flexmoe.errors import FlexmoeError
from flexmoe.methods.base import Method
from flexmoe.methods.build import build_method
from flexmoe.methods.rules import Reply
from flexmoe.tensors import Tensors
from flexmoe.rundir import CONFIG_FILE, is_run_dir

__all__ = ["InProcess", "Simulation"]


class InProcess:
    """The transport of the in-process engine: every client on the one model instance, its data
    tokenised only while a round needs it (`ClientPool`), its state on disk between its rounds."""

    def __init__(self, config: RunConfig, method: Method, runner: ClientRunner, clients: ClientPool,
                 workers: WorkerPool | None = None):
        self.config = config
        self.method = method
        self.runner = runner
        self.clients = clients
        self.workers = workers  # runtime.workers > 1: each client on a worker process (engine/workers.py)
        self.evaluated = evaluated_clients(config)
        self._trained: list[int] = []  # this round's clients: only their pending state to commit

    def infos(self) -> list[ClientInfo]:
        return self.clients.infos()

    def round_zero(self, evaluate_base: bool) -> tuple[list[dict], list[ClientInfo]]:
        # the others graft before their first round (`ClientRunner.train`)
        if self.workers is not None:  # as `ClientRunner.round_zero`: every base evaluation before any graft
            tasks = [(c,) for c in self.evaluated]
            base_evals = [v for _, v in self._checked(self.evaluated, self.workers.map("base", tasks))] \
                if evaluate_base else []
            if self.method.grafts:
                self._checked(self.evaluated, self.workers.map("graft", tasks))
            return base_evals, self.infos()
        base_evals = self.runner.round_zero([self.clients.get(c) for c in self.evaluated], evaluate_base)
        return base_evals, self.infos()

    def resume(self, completed: int) -> list[ClientInfo]:
        self.runner.store.commit(completed)
        return self.infos()

    def train(self, round_index: int, sampled: list[int], downlink: Tensors | None) -> tuple[list[dict], list[Reply], dict[int, str]]:
        down_blob = encode(downlink)
        self.clients.start_round(sampled)
        self._trained = list(sampled)
        if self.workers is not None:
            return self._train_on_workers(round_index, sampled, down_blob)
        records, replies, failures = [], [], {}
        for client_id in sampled:
            try:
                record, reply = self._train_client(self.clients.get(client_id), round_index, down_blob)
            except FlexmoeError:  # a user mistake (bad file, bad setting) stops the run with its one line
                raise
            except Exception as error:  # one client's crash must not cost the others their round
                failures[client_id] = failure_reason(error)
                continue
            records.append(record)
            if reply is not None:
                replies.append(reply)
        return records, replies, failures

    def _train_client(self, client: Client, round_index: int, down_blob: bytes | None):
        """One client's round through real bytes: the downlink blob in, the uplink blob out."""
        record, up_blob = train_client(self.runner, self.method, client, round_index, down_blob)
        return record, reply_of(client.client_id, up_blob)

    def _train_on_workers(self, round_index: int, sampled: list[int], down_blob: bytes | None):
        """`train` with each client on a worker: the same records, replies and failures, in the same order."""
        records, replies, failures = [], [], {}
        outcomes = self.workers.map("train", [(cid, round_index, sampled, down_blob) for cid in sampled])
        for client_id, (status, value) in zip(sampled, self._checked(sampled, outcomes, skip_failed=True)):
            if status == "failed":
                failures[client_id] = value[0]
                continue
            record, up_blob = value
            records.append(record)
            reply = reply_of(client_id, up_blob)
            if reply is not None:
                replies.append(reply)
        return records, replies, failures

    def _checked(self, client_ids: list[int], outcomes: list[tuple], skip_failed: bool = False) -> list[tuple]:
        """Workers' outcomes, each client's truncation counts noted for the report: the first
        `FlexmoeError` (in client order) re-raised; a client's crash re-raised unless `skip_failed`."""
        checked = []
        for client_id, (status, value) in zip(client_ids, outcomes):
            if status == "error":
                raise FlexmoeError(value[0])
            if status == "failed":
                if not skip_failed:
                    raise WorkerFailed(f"client {client_id}: {value[0]}") from RemoteTraceback(value[1])
                checked.append((status, value))
                continue
            value, truncation = value
            self.clients.note_truncation(client_id, truncation)
            checked.append((status, value))
        return checked

    def evaluate(self, round_index: int, received: Tensors, global_weights: Tensors | None,
                 base_load: dict | None) -> list[dict]:
        if self.workers is not None:
            received_blob, global_blob = encode(received), encode(global_weights)
            outcomes = self.workers.map("evaluate", [(c, round_index, received_blob, global_blob, base_load)
                                                     for c in self.evaluated])
            return [value for _, value in self._checked(self.evaluated, outcomes)]
        return [self.runner.evaluate(self.clients.get(c), round_index, received, base_load, global_weights)
                for c in self.evaluated]

    def commit(self, round_index: int) -> None:
        for client_id in self._trained:  # only they hold pending state: no walk over the population
            self.runner.store.commit(round_index, client_id)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()


class Simulation:
    """One run directory, run in this process."""

    def __init__(self, config: RunConfig, run_dir: Path, progress: Progress | None = None,
                 worker_setup: Callable[[], None] | None = None):
        if config.secagg.enabled:
            raise FlexmoeError("secagg.enabled: secure aggregation runs in Flower runs (flwr run); the in-process "
                               "engine would aggregate every update in the clear")
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress or Progress()
        self.method = build_method(config)
        self.worker_setup = worker_setup  # runtime.workers > 1: called in each worker once it is built (tests inject faults)

    @classmethod
    def resume(cls, run_dir: Path, progress: Progress | None = None, stop_after: int | None = None) -> dict:
        run_dir = Path(run_dir)
        if not is_run_dir(run_dir):
            raise FlexmoeError(f"{run_dir}: not a resumable run directory (no {CONFIG_FILE} or checkpoint)")
        return cls(load_config(run_dir / CONFIG_FILE), run_dir, progress).run(resume=True, stop_after=stop_after)

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train through `config.rounds` (or stop after round `stop_after`); returns the summary."""
        side = build_local_clients(self.config, self.method, self.run_dir, self.progress)
        workers = WorkerPool(self.config, self.run_dir, self.config.runtime.workers, self.progress, self.worker_setup) \
            if self.config.runtime.workers > 1 else None
        transport = InProcess(self.config, self.method, side.runner, side.clients, workers)
        try:
            return RoundDriver(side.server, transport, self.progress, side.model, side.tokenizer).run(
                resume=resume, stop_after=stop_after)
        finally:
            transport.close()
