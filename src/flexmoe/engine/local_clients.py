"""The in-process engine's client side, built the same way by the main process (`Simulation.run`)
and by each worker (`engine/workers.py`), and its messages as real bytes.

Every tensor dict that crosses between the server and a client in this engine is encoded here as
safetensors bytes (`flexmoe.wire`, what a Flower deployment sends), so the bytes a run counts are
the bytes a deployment would send; a test that patches `local_clients.serialize` sees every message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flexmoe.clients import Client, ClientPool, partition_data
from flexmoe.config import RunConfig
from flexmoe.engine.client import ClientRunner
from flexmoe.engine.driver import evaluated_clients
from flexmoe.engine.model import load_model
from flexmoe.engine.progress import Progress
from flexmoe.engine.server import ServerRunner
from flexmoe.methods.base import Method
from flexmoe.methods.rules import Reply
from flexmoe.rundir import CLIENTS_DIR, EVALS_DIR, ClientStore
from flexmoe.tensors import Tensors
from flexmoe.wire import deserialize, serialize


@dataclass
class LocalClients:
    """One process's client side: the model instance every client runs on in turn, the clients'
    data, the server (the main process's; a worker reads only its initial weights) and the runner."""

    model: object
    tokenizer: object
    clients: ClientPool
    server: ServerRunner
    runner: ClientRunner


def build_local_clients(config: RunConfig, method: Method, run_dir: Path, progress: Progress) -> LocalClients:
    model, tokenizer = load_model(config, method)
    clients = ClientPool(config, partition_data(config), tokenizer, evaluated_clients(config))
    server = ServerRunner(config, method, run_dir)  # built first: the clients start from its initial weights
    runner = ClientRunner(config, method, model, tokenizer, ClientStore(run_dir / CLIENTS_DIR),
                          server.initial_weights, progress, detail_dir=run_dir / EVALS_DIR)
    return LocalClients(model, tokenizer, clients, server, runner)


def encode(tensors: Tensors | None, metadata: dict | None = None) -> bytes | None:
    return serialize(tensors, metadata) if tensors is not None else None


def decode(blob: bytes | None) -> Tensors | None:
    return deserialize(blob)[0] if blob is not None else None


def train_client(runner: ClientRunner, method: Method, client: Client, round_index: int,
                 down_blob: bytes | None) -> tuple[dict, bytes | None]:
    """One client's round through real bytes: the downlink blob in -> (its train record with
    `bytes_up`/`bytes_down`, the uplink blob; None for a method that sends nothing)."""
    record, message = runner.train(client, round_index, decode(down_blob) or {})
    up_blob = encode(message, {"num_examples": str(record["num_examples"])}) if method.communicates else None
    record.update(bytes_up=len(up_blob) if up_blob is not None else 0,
                  bytes_down=len(down_blob) if down_blob is not None else 0)
    return record, up_blob


def reply_of(client_id: int, up_blob: bytes | None) -> Reply | None:
    if up_blob is None:
        return None
    tensors, meta = deserialize(up_blob)
    return Reply(tensors, int(meta["num_examples"]), client=client_id)
