"""The flexmoe ClientApp: one federated client per SuperNode, running `flexmoe.engine.client`'s
client step on the node's own data and personal state.

Node config (`flower-supernode --node-config "..."`; simulation sets the first two itself):
- `partition-id`: this client's id, 0 .. num_clients-1 (its part of the run's data partition);
- `num-partitions`: if given, must equal the run's `num_clients`;
- `state-dir`: where this client keeps its personal state (graft, gate, method and optimiser
  state), as `<state-dir>/<run>/<partition-id>/` (`<run>`: the run directory's name and a hash of
  its path, so runs sharing a SuperNode never mix states and a resumed run finds its own);
  default `<run dir>/clients`, the in-process layout;
- `data-path`: optional; this node's own examples file (any `flexmoe` data format), used whole
  as its data (split into train/test with `data.test_fraction`) instead of the run's partition;
- `audit-dir`: optional; a copy of every message this node sends, exactly as Flower transfers it
  (see `audit_outgoing`).

Each message may start a fresh process, so every call rebuilds the model; personal state lives
on the node's disk, and `Context.state` holds only small metadata (client id, last round).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexmoe.engine.flower.messages import (
    ARRAYS, CONFIG, DETAIL, GLOBAL, METRICS, RESULT, config_from_text, counted_round, from_arrays, pack_detail,
    to_arrays,
)
from flexmoe.errors import FlexmoeError
from flexmoe.files import write_bytes_atomic


def audit_outgoing(msg: Message, context: Context, call_next) -> Message:
    """With node config `audit-dir`, keep a copy of every reply this node sends: the content-addressed
    objects Flower transfers for it (the message, its records, each array), one file per object
    named by its id (the sha256 of its bytes), in `<audit-dir>/<run id>/<instruction id>/`, so an
    organisation can check what left its machine."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    reply = call_next(msg, context)
    directory = context.node_config.get("audit-dir")
    if directory:
        target = Path(str(directory)) / str(msg.metadata.run_id) / msg.metadata.message_id
        target.mkdir(parents=True, exist_ok=True)
        for object_id, obj in get_all_nested_objects(reply).items():
            write_bytes_atomic(target / object_id, obj.deflate())
    return reply


def secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """A training message of Flower's SecAgg+ protocol (the server's `secagg.enabled`) goes through
    Flower's `secaggplus_mod`, which trains through `secagg.masked_train` and sends only the masked,
    quantised update; every other message passes untouched."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    from flexmoe.engine.flower.secagg import masked_train

    return secaggplus_mod(msg, context, lambda inner, ctx: masked_train(inner, ctx, train_content))


app = ClientApp(mods=[audit_outgoing, secure_aggregation])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(train_content(msg.content, context), reply_to=msg)


def train_content(content: RecordDict, context: Context) -> RecordDict:
    """One round of local training for the message `content`: the reply's content."""
    node = _Node(content, context)
    received = from_arrays(content[ARRAYS]) if ARRAYS in content else {}
    record, message = node.runner.train(node.client, node.round, received)
    node.remember(last_trained=node.round)
    reply = _reply(record, node.client.client_id, record["num_examples"])
    if node.method.communicates:
        reply[ARRAYS] = to_arrays(message)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Round 0 ("phase" = "base"): the untouched base, then grafting; later rounds: the
    personalised model (what the client received + its own state) and, when the server sends
    it, the global model, both on this client's test split."""
    from flexmoe.engine.driver import evaluated_clients

    node = _Node(msg.content, context)
    client, runner, settings = node.client, node.runner, msg.content[CONFIG]
    with tempfile.TemporaryDirectory(prefix="flexmoe-evals-") as detail:
        runner.evaluator.detail_dir = Path(detail)  # the per-example files, sent with the reply (`DETAIL`)
        if settings["phase"] == "base":
            # as in process: the evaluated clients (`eval.clients`) evaluate the base and graft now, the
            # others graft before their first round (`ClientRunner.train`)
            evaluated = [client] if client.client_id in evaluated_clients(node.config) else []
            records = runner.round_zero(evaluated, node.config.eval.base)
            content = _reply(records[0] if records else {}, client.client_id, len(client.test))
            content["info"] = _info(client)
        else:
            base_load = json.loads(str(settings["base-load"]))
            received = from_arrays(msg.content[ARRAYS]) if ARRAYS in msg.content else {}
            global_weights = from_arrays(msg.content[GLOBAL]) if GLOBAL in msg.content else None
            record = runner.evaluate(client, node.round, received, base_load, global_weights)
            content = _reply(record, client.client_id, len(client.test))
        content[DETAIL] = ConfigRecord({"files": json.dumps(pack_detail(Path(detail)))})
    return Message(content, reply_to=msg)


@app.query()
def commit(msg: Message, context: Context) -> Message:
    """The server committed a round: promote this client's pending state (no model needed). With
    "phase" = "identify" (a SuperNode the server has not seen: restarted, late, or a resumed run),
    also say which client this node is."""
    from flexmoe.rundir import ClientStore

    settings = msg.content[CONFIG]
    client_id, root = _identity(msg.content, context)
    settle(ClientStore(root), client_id, settings)
    content = _reply({}, client_id, 0)
    if settings["phase"] == "identify":
        config = config_from_text(str(settings["flexmoe-config"]))
        from flexmoe.clients import Client, capped_train

        part = _client_data(config, context.node_config, client_id)
        train = capped_train(config, part)
        content["info"] = _info(Client(client_id, train, part.test, [], skipped=part.skipped))
    return Message(content, reply_to=msg)


def _reply(record: dict, client_id: int, num_examples: int) -> RecordDict:
    """The client's metrics record travels as JSON (exact floats, nested values such as the
    per-layer expert load); `num-examples` and `client` as Flower metrics."""
    return RecordDict({METRICS: MetricRecord({"num-examples": num_examples, "client": client_id}),
                       RESULT: ConfigRecord({"record": json.dumps(record)})})


def settle(store, client_id: int, settings) -> None:
    """Bring the client's stored state in line with the server before anything reads it
    (`ClientStore.settle`): promote pending state only of the round the server last counted for
    this client (its entry in `counted-rounds`, looked up by its own id: the server may not know yet
    which client this node is), drop it otherwise; an evaluation keeps the state of the round in
    progress, which it reads."""
    store.settle(client_id, committed=int(settings["committed"]), counted=counted_round(settings, client_id),
                 keep_in_progress=settings["phase"] == "eval")


def _info(client) -> ConfigRecord:
    """What the server's report shows of this client (`clients.describe`: groups, counts,
    truncation; no examples)."""
    import dataclasses

    from flexmoe.clients import describe

    return ConfigRecord({"describe": json.dumps(dataclasses.asdict(describe(client)))})


def _identity(content: RecordDict, context: Context) -> tuple[int, Path]:
    """(client id, personal-state root) from the node config and the server's run directory."""
    node = context.node_config
    if "partition-id" not in node:
        raise FlexmoeError("SuperNode node config lacks 'partition-id' (start it with "
                           "--node-config \"partition-id=0 state-dir='...'\")")
    run_dir = Path(str(content[CONFIG]["run-dir"]))
    if not node.get("state-dir"):
        return int(node["partition-id"]), run_dir / "clients"
    return int(node["partition-id"]), Path(str(node["state-dir"])) / run_key(run_dir)


def run_key(run_dir: Path) -> str:
    """A SuperNode's folder for one run: the run directory's name and a hash of its full path."""
    return f"{run_dir.name}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]}"


def _client_data(config, node_config, client_id: int):
    """This client's `ClientData`: its part of the run's partition, or the node's own `data-path`."""
    import flexmoe.data
    from flexmoe.clients import own_data, partition_data

    data_path = node_config.get("data-path")
    if not data_path:
        return partition_data(config)[client_id]
    examples, skipped = flexmoe.data.load_data(str(data_path), fields=dict(config.data.fields) or None,
                                               skip_invalid=config.data.skip_invalid)
    return own_data(config, examples, client_id, str(data_path), skipped)


class _Node:
    """This node's client: config from the message, data and state from the node config."""

    def __init__(self, content: RecordDict, context: Context):
        from flexmoe.engine.client import ClientRunner
        from flexmoe.engine.model import load_model, shared_params, use_threads
        from flexmoe.methods.build import build_method
        from flexmoe.rundir import ClientStore
        from flexmoe.tensors import cpu_clone

        settings = content[CONFIG]
        self.context = context
        self.config = config_from_text(str(settings["flexmoe-config"]))
        self.round = int(settings["round"])
        use_threads(self.config)  # this process serves this client alone
        client_id, root = _identity(content, context)
        self._check_partitions(client_id)
        store = ClientStore(root)
        settle(store, client_id, settings)
        self.method = build_method(self.config)
        model, tokenizer = load_model(self.config, self.method)
        initial = cpu_clone(shared_params(model, self.method))  # the seeded round-0 shared weights, as on the server
        self.client = self._client(client_id, tokenizer)
        self.runner = ClientRunner(self.config, self.method, model, tokenizer, store, lambda: initial)
        self.remember()

    def _check_partitions(self, client_id: int) -> None:
        count = self.context.node_config.get("num-partitions")
        if count is not None and int(count) != self.config.num_clients:
            raise FlexmoeError(f"{count} SuperNodes (num-partitions) but the run config has "
                               f"num_clients = {self.config.num_clients}")
        if not 0 <= client_id < self.config.num_clients:
            raise FlexmoeError(f"node config partition-id = {client_id} is outside 0..{self.config.num_clients - 1}")

    def _client(self, client_id: int, tokenizer):
        from flexmoe.clients import make_client

        return make_client(self.config, _client_data(self.config, self.context.node_config, client_id), tokenizer)

    def remember(self, **values: int) -> None:
        """Small metadata only: Context.state over ~100 MB is dropped on a real SuperNode."""
        state = self.context.state.get("flexmoe")
        merged = {**(dict(state) if state is not None else {}), "client": self.client.client_id, **values}
        self.context.state["flexmoe"] = ConfigRecord(merged)
