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
"""

from __future__ import annotations

from pathlib import Path

from flexmoe.config import RunConfig, load_config
from flexmoe.clients import Client, ClientInfo, ClientPool, partition_data
from flexmoe.engine.client import ClientRunner
from flexmoe.engine.driver import RoundDriver, evaluated_clients
from flexmoe.engine.model import load_model
from flexmoe.engine.progress import Progress
from flexmoe.engine.server import ServerRunner, failure_reason
from flexmoe.errors import FlexmoeError
from flexmoe.methods.base import Method
from flexmoe.methods.build import build_method
from flexmoe.methods.rules import Reply
from flexmoe.tensors import Tensors
from flexmoe.rundir import CLIENTS_DIR, CONFIG_FILE, EVALS_DIR, ClientStore, is_run_dir
from flexmoe.wire import deserialize, serialize

__all__ = ["InProcess", "Simulation"]


class InProcess:
    """The transport of the in-process engine: every client on the one model instance, its data
    tokenised only while a round needs it (`ClientPool`), its state on disk between its rounds."""

    def __init__(self, config: RunConfig, method: Method, runner: ClientRunner, clients: ClientPool):
        self.config = config
        self.method = method
        self.runner = runner
        self.clients = clients
        self.evaluated = evaluated_clients(config)
        self._trained: list[int] = []  # this round's clients: only their pending state to commit

    def infos(self) -> list[ClientInfo]:
        return self.clients.infos()

    def round_zero(self, evaluate_base: bool) -> tuple[list[dict], list[ClientInfo]]:
        # the others graft before their first round (`ClientRunner.train`)
        base_evals = self.runner.round_zero([self.clients.get(c) for c in self.evaluated], evaluate_base)
        return base_evals, self.infos()

    def resume(self, completed: int) -> list[ClientInfo]:
        self.runner.store.commit(completed)
        return self.infos()

    def train(self, round_index: int, sampled: list[int], downlink: Tensors | None) -> tuple[list[dict], list[Reply], dict[int, str]]:
        down_blob = serialize(downlink) if downlink is not None else None
        records, replies, failures = [], [], {}
        self.clients.start_round(sampled)
        self._trained = list(sampled)
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
        received = deserialize(down_blob)[0] if down_blob is not None else {}
        record, message = self.runner.train(client, round_index, received)
        reply, bytes_up = None, 0
        if self.method.communicates:
            up_blob = serialize(message, {"num_examples": str(record["num_examples"])})
            bytes_up = len(up_blob)
            tensors, meta = deserialize(up_blob)
            reply = Reply(tensors, int(meta["num_examples"]), client=client.client_id)
        record.update(bytes_up=bytes_up, bytes_down=len(down_blob) if down_blob is not None else 0)
        return record, reply

    def evaluate(self, round_index: int, received: Tensors, global_weights: Tensors | None,
                 base_load: dict | None) -> list[dict]:
        return [self.runner.evaluate(self.clients.get(c), round_index, received, base_load, global_weights)
                for c in self.evaluated]

    def commit(self, round_index: int) -> None:
        for client_id in self._trained:  # only they hold pending state: no walk over the population
            self.runner.store.commit(round_index, client_id)


class Simulation:
    """One run directory, run in this process."""

    def __init__(self, config: RunConfig, run_dir: Path, progress: Progress | None = None):
        if config.secagg.enabled:
            raise FlexmoeError("secagg.enabled: secure aggregation runs in Flower runs (flwr run); the in-process "
                               "engine would aggregate every update in the clear")
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress or Progress()
        self.method = build_method(config)

    @classmethod
    def resume(cls, run_dir: Path, progress: Progress | None = None, stop_after: int | None = None) -> dict:
        run_dir = Path(run_dir)
        if not is_run_dir(run_dir):
            raise FlexmoeError(f"{run_dir}: not a resumable run directory (no {CONFIG_FILE} or checkpoint)")
        return cls(load_config(run_dir / CONFIG_FILE), run_dir, progress).run(resume=True, stop_after=stop_after)

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train through `config.rounds` (or stop after round `stop_after`); returns the summary."""
        model, tokenizer = load_model(self.config, self.method)
        clients = ClientPool(self.config, partition_data(self.config), tokenizer, evaluated_clients(self.config))
        server = ServerRunner(self.config, self.method, self.run_dir)
        runner = ClientRunner(self.config, self.method, model, tokenizer, ClientStore(self.run_dir / CLIENTS_DIR),
                              server.initial_weights, self.progress, detail_dir=self.run_dir / EVALS_DIR)
        transport = InProcess(self.config, self.method, runner, clients)
        return RoundDriver(server, transport, self.progress, model, tokenizer).run(resume=resume, stop_after=stop_after)
