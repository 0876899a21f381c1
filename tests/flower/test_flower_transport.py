"""The Flower ServerApp's real messages, delivered in this process to the real flexmoe ClientApp.

`FlowerTransport` builds its messages as in a deployment; `LoopbackGrid` hands each one to the
ClientApp (queries: identification and commits) or to what the ClientApp does first with a train
or evaluate message, settling the client's stored state (`client_app.settle`). No Flower process
starts, so these run with the fast tests; tests/flower/test_flower.py runs the same in deployments.
"""

from __future__ import annotations

import pytest
from flwr.app import Context, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flexmoe.config import load_config
from flexmoe.engine.flower import client_app
from flexmoe.engine.flower.messages import CONFIG, counted_round
from flexmoe.engine.flower.server_app import FlowerTransport
from flexmoe.engine.server import ServerRunner
from flexmoe.methods.build import build_method
from flexmoe.rundir import ClientStore


class LoopbackGrid:
    """A Grid whose SuperNodes (node id -> partition id) all keep their state under `state_dir`."""

    def __init__(self, state_dir, nodes: dict[int, int]):
        self.state_dir, self.nodes = state_dir, dict(nodes)
        self.sent = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={"partition-id": self.nodes[node],
                                                                   "state-dir": str(self.state_dir)},
                              state=RecordDict(), run_config={})
            TaskIdentity.node_id = node  # a reply's sender, as on a SuperNode
            if message.metadata.message_type == MessageType.QUERY:
                replies.append(client_app.app(message, context))
            else:  # no reply: the round counts the client as failed, which these tests do not read
                client_id, root = client_app._identity(message.content, context)
                client_app.settle(ClientStore(root), client_id, message.content[CONFIG])
        TaskIdentity.node_id = 0
        return replies


@pytest.fixture
def server_identity(monkeypatch):
    """Messages are stamped with the identity of the task that makes them (the ServerApp's)."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def with_pending(store: ClientStore, client: int, committed: bytes, pending_round: int) -> None:
    """Client state as a SuperNode leaves it: final files of an earlier round, and a round's pending ones."""
    store.dir(client).mkdir(parents=True)
    (store.dir(client) / "state.safetensors").write_bytes(committed)
    (store.begin(client) / "state.safetensors").write_bytes(f"round {pending_round}".encode())
    store.finish(client, pending_round)


def state_of(store: ClientStore, client: int) -> bytes:
    assert not store.pending(client).exists()
    return (store.dir(client) / "state.safetensors").read_bytes()


def transport_and_store(tmp_path, grid_nodes: dict[int, int], **settings):
    config = load_config(None, [f"{k}={v}" for k, v in settings.items()])
    run_dir = tmp_path / "run"
    grid = LoopbackGrid(tmp_path / "state", grid_nodes)
    server = ServerRunner(config, build_method(config), run_dir)
    transport = FlowerTransport(grid, server, round_timeout=1.0, min_clients=len(grid_nodes), connect_timeout=1.0)
    return transport, grid, ClientStore(tmp_path / "state" / client_app.run_key(run_dir))


def test_a_restarted_supernode_keeps_the_state_of_the_round_the_server_counted(tmp_path, server_identity):
    """SuperNode 1 sent its round-3 reply (counted) and was killed before promoting that round's
    state; it comes back on a new node id for round 4. The server does not know that node yet, so it
    learns which client it is from its answer: the message must still carry client 1's counted
    round (3), or the node drops a round the server aggregated. Client 2's round-3 reply was lost
    (the server last counted it in round 2): its round-3 state is dropped."""
    transport, grid, store = transport_and_store(tmp_path, {10: 0, 21: 1, 12: 2}, num_clients=3, rounds=4)
    transport.nodes = {0: 10, 1: 11, 2: 12}  # node 11 is gone; node 21 is new
    with_pending(store, 1, b"round 2", 3)
    with_pending(store, 2, b"round 2", 3)
    transport.server.counted = {0: 3, 1: 3, 2: 2}
    transport.train(4, [0, 1, 2], None)
    identify = [m for m in grid.sent if m.content[CONFIG]["phase"] == "identify"]
    assert [m.metadata.dst_node_id for m in identify] == [21]
    assert counted_round(identify[0].content[CONFIG], 1) == 3
    assert transport.nodes == {0: 10, 1: 21, 2: 12}
    assert state_of(store, 1) == b"round 3"
    assert state_of(store, 2) == b"round 2"


def test_resume_tells_every_client_its_own_last_counted_round(tmp_path, server_identity):
    """A resumed ServerApp knows no node: each node is asked which client it is, with the message
    saying every client's last counted round. With 1 client of 3 per round, client 1 last trained in
    round 2 and has had no message since (its state of round 2 still pending): it keeps it, as
    does client 0 of round 4; client 2's round-3 reply was lost, so its last counted round is 1."""
    transport, grid, store = transport_and_store(tmp_path, {30: 0, 31: 1, 32: 2}, num_clients=3,
                                                 clients_per_round=1, rounds=6)
    with_pending(store, 0, b"round 3", 4)
    with_pending(store, 1, b"round 1", 2)
    with_pending(store, 2, b"round 1", 3)
    transport.server.counted = {0: 4, 1: 2, 2: 1}
    infos = transport.resume(4)
    assert [info.client_id for info in infos] == [0, 1, 2]
    assert all(m.content[CONFIG]["committed"] == 4 for m in grid.sent)
    assert [counted_round(m.content[CONFIG], c) for m in grid.sent for c in range(3)] == [4, 2, 1] * 3
    assert [state_of(store, c) for c in range(3)] == [b"round 4", b"round 2", b"round 1"]
