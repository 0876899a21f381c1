"""Secure aggregation (`secagg.enabled`) through Flower's SecAgg+: the server's workflow and the
clients' mod exchange real protocol messages through a Grid that calls each node's ClientApp in
this process (training replaced by known updates, so the expected mean is exact); the mean equals
the plain weighted mean within SecAgg+'s quantisation, the server never receives an update's
arrays, and a client that drops out before sending its masked update does not stall the round."""

from __future__ import annotations

import json

import pytest
import torch

from flexmoe.config import load_config
from flexmoe.errors import FlexmoeError

NAMES = ("a.lora_A.weight", "a.lora_B.weight")


def updates_of(client: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + client)
    return {"a.lora_A.weight": 0.05 * torch.randn(4, 6, generator=generator),
            "a.lora_B.weight": 0.05 * torch.randn(6, 4, generator=generator)}


class LoopbackGrid:
    """Delivers every message to its node's ClientApp (mods included) with that node's own Context;
    a node in `dropped` answers nothing from the masked-vector stage on."""

    def __init__(self, app, nodes: dict[int, int], dropped: set[int] = frozenset()):
        from flwr.app import Context, RecordDict

        self.app, self.dropped, self.replies = app, dropped, []
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": client}, state=RecordDict(),
                                       run_config={}) for node, client in nodes.items()}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

        replies = []
        for message in messages:
            message = own_copy(message)
            node = message.metadata.dst_node_id
            stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if node in self.dropped and stage in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
                continue
            replies.append(self.app(message, self.contexts[node]))
        self.replies.extend(replies)
        return replies


def own_copy(message):
    """On a real wire every node receives its own copy (the mod edits the config record it gets)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    content = RecordDict({key: ConfigRecord(dict(record)) if isinstance(record, ConfigRecord) else record
                          for key, record in message.content.items()})
    return Message(content, dst_node_id=message.metadata.dst_node_id, message_type=message.metadata.message_type,
                   group_id=message.metadata.group_id)


@pytest.fixture
def known_training(monkeypatch):
    """Each client 'trains' to received + its known update, with examples 10, 20, 30."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from flexmoe.engine.flower import client_app
    from flexmoe.engine.flower.messages import ARRAYS, METRICS, RESULT, from_arrays, to_arrays

    def train_content(content, context):
        client = int(context.node_config["partition-id"])
        received = from_arrays(content[ARRAYS])
        trained = {n: received[n] + u for n, u in updates_of(client).items()}
        record = {"round": int(content["config"]["round"]), "kind": "train", "client": client,
                  "num_examples": 10 * (client + 1), "loss": 1.0}
        return RecordDict({METRICS: MetricRecord({"num-examples": record["num_examples"], "client": client}),
                           RESULT: ConfigRecord({"record": json.dumps(record)}), ARRAYS: to_arrays(trained)})

    monkeypatch.setattr(client_app, "train_content", train_content)
    from flwr.supercore.task_identity import TaskIdentity

    # who this process is, as a ServerApp process is told by Flower (messages are stamped with it)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def secure(dropped: set[int] = frozenset(), *overrides: str):
    from flexmoe.engine.flower.client_app import app
    from flexmoe.engine.flower.messages import config_text
    from flexmoe.engine.flower.secagg import secure_round

    config = load_config(None, ["method=fedavg", "num_clients=3", "secagg.enabled=true", *overrides])
    nodes = {1001: 0, 1002: 1, 1003: 2}
    grid = LoopbackGrid(app, nodes, dropped)
    downlink = {n: torch.full(updates_of(0)[n].shape, 0.5) for n in NAMES}
    settings = {node: {"flexmoe-config": config_text(config), "round": 1} for node in nodes}
    records, reply, aggregated = secure_round(grid, config, 1, settings, downlink, timeout=5.0)
    return config, grid, downlink, records, reply, aggregated


def expected_mean(downlink, clients, uniform=False):
    weights = {c: 1.0 if uniform else 10.0 * (c + 1) for c in clients}
    total = sum(weights.values())
    return {n: downlink[n] + sum(weights[c] * updates_of(c)[n] for c in clients) / total for n in downlink}


def tolerance(config, clients) -> float:
    """SecAgg+'s rounding: each value is quantised to steps of 2c / (levels - 1) after scaling by its
    weight / max_weight (itself rounded to 1 / levels), so the mean's error is a few steps scaled back."""
    s = config.secagg
    step = 2 * s.clipping_range / (s.quantization_range - 1)
    smallest = min(10.0 * (c + 1) for c in clients) / s.max_weight
    return 4 * len(clients) * step / smallest


def test_secure_mean_equals_the_plain_weighted_mean_within_quantisation(known_training):
    config, grid, downlink, records, reply, aggregated = secure()
    assert aggregated == {1001, 1002, 1003} and [r["client"] for r in records] == [0, 1, 2]
    expected = expected_mean(downlink, [0, 1, 2])
    error = max(float((reply.tensors[n] - expected[n]).abs().max()) for n in NAMES)
    assert 0 < error <= tolerance(config, [0, 1, 2])  # quantised, not exact, and within SecAgg+'s rounding
    assert reply.num_examples == 60 and all(r["secagg_clipped"] == 0 for r in records)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in records)
    # no reply carried any array: the masked vector travels as integers in a ConfigRecord
    assert all(not any(len(record) for record in r.content.array_records.values()) for r in grid.replies)


def test_a_client_dropped_after_sharing_its_keys_does_not_stall_the_round(known_training):
    config, _, downlink, records, reply, aggregated = secure({1003})
    assert aggregated == {1001, 1002} and [r["client"] for r in records] == [0, 1]
    expected = expected_mean(downlink, [0, 1])
    assert max(float((reply.tensors[n] - expected[n]).abs().max()) for n in NAMES) <= tolerance(config, [0, 1])


def test_values_beyond_the_clipping_range_are_clipped_and_counted(known_training):
    # SecAgg+ clips weight / max_weight * value: with uniform weights (1) and max_weight 1000, a
    # clipping range of 2e-5 clips each update value to +-0.02
    config, _, downlink, records, reply, _ = secure(frozenset(), "secagg.clipping_range=2e-5",
                                                    "server.weighting=uniform")
    beyond = sum(int((updates_of(c)[n].abs() > 0.02).sum()) for c in range(3) for n in NAMES)
    assert beyond > 0 and sum(r["secagg_clipped"] for r in records) == beyond
    clipped = {n: downlink[n] + sum(updates_of(c)[n].clamp(-0.02, 0.02) for c in range(3)) / 3 for n in NAMES}
    assert max(float((reply.tensors[n] - clipped[n]).abs().max()) for n in NAMES) <= 1e-5


@pytest.mark.parametrize("overrides,words", [
    (["server.robust=median"], "server.robust needs each client's update"),
    (["privacy.noise_multiplier=1.0"], "server-side DP"),
    (["validation.max_update_norm=1.0"], "validation.max_update_norm needs"),
    (["method=scaffold"], "does not send"),
    (["method=fcmoe"], "does not send"),
    (["wire.quantize=int8"], "quantises and masks the uplink itself"),
    (["num_clients=1"], "at least 2 clients"),
])
def test_impossible_combinations_with_secagg_are_one_line(overrides, words):
    with pytest.raises(FlexmoeError, match=words) as error:
        load_config(None, ["secagg.enabled=true", *overrides])
    assert "\n" not in str(error.value)


def test_the_in_process_engine_refuses_secagg(tmp_path):
    from flexmoe.engine.simulation import Simulation

    with pytest.raises(FlexmoeError, match="in the clear"):
        Simulation(load_config(None, ["secagg.enabled=true"]), tmp_path)
