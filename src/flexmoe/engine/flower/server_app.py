"""The flexmoe ServerApp: the round driver (`engine/driver.py`) over a Flower Grid.

The round loop is the in-process engine's own driver: the same seeded client sampling, the
method's own downlink and aggregation (only the shared keys travel; FLEx's graft never leaves a
client), the same run directory, `metrics.jsonl`, `summary.json`, checkpoints and report. This
module only exchanges messages and discovers nodes. Bytes are those of the Flower messages'
ArrayRecords (see `messages`).

Run config (`flwr run . --run-config "..."`, defaults in pyproject.toml `[tool.flwr.app.config]`):
- `config`: a flexmoe run-config TOML file on the server ("" = the defaults);
- `set`: overrides, `key=value` items separated by ';' (e.g. `rounds=2;seed=1`);
- `output-dir`: the run directory ("" = `runs/flower-<method>-<timestamp>`);
- `round-timeout`: seconds a round waits for replies; a client that has not answered by then
  (failed, killed, unreachable) is skipped for the round;
- `min-clients`: SuperNodes to wait for before round 0 (0 = `num_clients`);
- `connect-timeout`: seconds to wait for them;
- `resume`: continue the run in `output-dir` from its last committed round (its own config;
  `config` and `set` must be empty), e.g. after the ServerApp was killed.

Every round starts from the SuperNodes online now: a client whose node is gone is skipped, and a
node the server has not seen (a restarted SuperNode gets a new node id unless SuperNode
authentication is on) is asked which client it is and takes that client's place. Every message
carries every client's last counted round, keyed by client id, so such a node settles its state
by its own round before the server knows which client it is.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from flexmoe.clients import ClientInfo
from flexmoe.engine.flower.messages import (
    ARRAYS, CONFIG, COUNTED_ROUNDS, DETAIL, GLOBAL, METRICS, RESULT, config_text, counted_rounds_text, from_arrays,
    parse_overrides, record_bytes, to_arrays, unpack_detail,
)
from flexmoe.errors import FlexmoeError
from flexmoe.rundir import CONFIG_FILE, EVALS_DIR

app = ServerApp()
log = logging.getLogger("flexmoe.flower")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from flexmoe.config import load_config
    from flexmoe.engine.driver import RoundDriver
    from flexmoe.engine.server import ServerRunner
    from flexmoe.methods.build import build_method

    settings = context.run_config
    resume = bool(settings.get("resume", False))
    if resume:
        run_dir = _resumable(settings)
        config = load_config(run_dir / CONFIG_FILE)
    else:
        config = load_config(str(settings["config"]) or None, parse_overrides(str(settings.get("set", ""))))
        run_dir = Path(str(settings["output-dir"]) or f"runs/flower-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    refuse_in_flower(config)
    server = ServerRunner(config, build_method(config), run_dir.resolve())
    transport = FlowerTransport(grid, server, round_timeout=float(settings["round-timeout"]),
                                min_clients=int(settings["min-clients"]) or config.num_clients,
                                connect_timeout=float(settings["connect-timeout"]))
    RoundDriver(server, transport).run(resume)
    log.info("flexmoe: %d rounds done, run directory %s", config.rounds, run_dir)


def refuse_in_flower(config) -> None:
    """The settings the Flower engine cannot honour, refused in one line before anything starts."""
    if config.faults.malicious_clients:
        raise FlexmoeError("faults.malicious_clients: the attack harness is an in-process research tool "
                           "(flexmoe run); the Flower engine refuses it")
    if config.runtime.workers > 1:
        raise FlexmoeError(f"runtime.workers = {config.runtime.workers}: worker processes are the in-process "
                           "engine's (flexmoe run); Flower runs each client in a SuperNode of its own, so leave it at 1")


def _resumable(settings) -> Path:
    from flexmoe.rundir import is_run_dir

    if str(settings.get("config", "")) or str(settings.get("set", "")):
        raise FlexmoeError("run config: resume=true continues the run with its own config; leave 'config' and 'set' empty")
    if not str(settings["output-dir"]):
        raise FlexmoeError("run config: resume=true needs output-dir, the run directory to continue")
    run_dir = Path(str(settings["output-dir"]))
    if not is_run_dir(run_dir):
        raise FlexmoeError(f"{run_dir}: not a resumable run directory (no {CONFIG_FILE} or checkpoint)")
    return run_dir


class FlowerTransport:
    """The driver's transport over a Flower Grid: one SuperNode per client, found by asking.

    Every exchange starts from the SuperNodes online now: a client whose node is gone is skipped,
    and a node not seen before (a restarted SuperNode gets a new node id unless SuperNode
    authentication is on) is asked which client it is and takes that client's place. Every message
    carries the `server`'s counted rounds (`ServerRunner.counted`) as they stand when it is sent."""

    def __init__(self, grid: Grid, server, round_timeout: float, min_clients: int, connect_timeout: float):
        self.grid = grid
        self.server = server
        self.config = server.config
        self.run_dir = server.run_dir
        self.round_timeout = round_timeout
        self.min_clients = min_clients
        self.connect_timeout = connect_timeout
        self.nodes: dict[int, int] = {}  # client id -> node id
        self._infos: dict[int, ClientInfo] = {}

    # ---- the driver's transport ---------------------------------------------------------------
    def round_zero(self, evaluate_base: bool) -> tuple[list[dict], list[ClientInfo]]:
        """Every node says which client it is; the evaluated ones (`eval.clients`) evaluate the untouched
        base and graft (the others graft before their first round)."""
        replies = self._send(MessageType.EVALUATE, self._wait_for_nodes(), 0, None, phase="base")
        base_evals = []
        for node_id, reply in replies:
            cid, record = _client(reply), _record(reply)
            if cid in self.nodes:
                raise FlexmoeError(f"two SuperNodes claim partition-id {cid}")
            self.nodes[cid] = node_id
            self._infos[cid] = _info(cid, reply.content["info"])
            self._keep_detail(reply, 0)
            if record:
                base_evals.append(record)
        return sorted(base_evals, key=lambda r: r["client"]), self._sorted_infos()

    def resume(self, completed: int) -> list[ClientInfo]:
        """Every node says which client it is and drops the state of rounds that never committed."""
        self._identify(self._wait_for_nodes(), completed)
        log.info("flexmoe: resuming %s after round %d", self.run_dir, completed)
        return self._sorted_infos()

    def train(self, round_index: int, sampled: list[int], downlink):
        """The sampled clients train; one that fails, is gone or does not answer within the round
        timeout is reported back as failed, and the round aggregates the rest."""
        from flexmoe.methods.rules import Reply

        online = self._online(round_index - 1)
        if self.config.secagg.enabled:
            return self._secure_train(round_index, sampled, online, downlink)
        arrays = to_arrays(downlink) if downlink is not None else None
        bytes_down = record_bytes(arrays) if arrays is not None else 0
        replies, failures = self._exchange(MessageType.TRAIN, [online[c] for c in sampled if c in online],
                                           round_index, arrays)
        failures.update({c: "no SuperNode of this client is online" for c in sampled if c not in online})
        records, uploads = [], []
        for _, reply in replies:
            record = _record(reply)
            record["bytes_down"] = bytes_down
            record["bytes_up"] = record_bytes(reply.content[ARRAYS]) if ARRAYS in reply.content else 0
            records.append(record)
            if ARRAYS in reply.content:
                uploads.append(Reply(from_arrays(reply.content[ARRAYS]), int(reply.content[METRICS]["num-examples"]),
                                     client=record["client"]))
        return records, uploads, {c: f"ClientFailed: {why}" for c, why in failures.items()}

    def _secure_train(self, round_index: int, sampled: list[int], online: dict[int, int], downlink):
        """The round through Flower's SecAgg+ (engine/flower/secagg.py): one reply, the mean update
        added to the global weights; a sampled client that was not aggregated has failed."""
        from flexmoe.engine.flower.secagg import secure_round

        nodes = [online[c] for c in sampled if c in online]
        settings = {node: self._settings(MessageType.TRAIN, round_index, phase="train") for node in nodes}
        records, reply, aggregated = secure_round(self.grid, self.config, round_index, settings, downlink,
                                                  timeout=self.round_timeout)
        failures = {c: "no SuperNode of this client is online" for c in sampled if c not in online}
        for client in sampled:
            if client in online and online[client] not in aggregated:
                failures[client] = "not aggregated by SecAgg+ (no reply in time, or the protocol halted)"
                log.warning("round %d: client %d was not aggregated by SecAgg+; skipped", round_index, client)
        return records, [reply] if reply is not None else [], {c: f"ClientFailed: {why}" for c, why in failures.items()}

    def evaluate(self, round_index: int, received, global_weights, base_load) -> list[dict]:
        """Every online client of `evaluated_clients` evaluates on its own test split (`ClientRunner.evaluate`)."""
        from flexmoe.engine.driver import evaluated_clients

        arrays = to_arrays(received) if received else None
        extra = {} if global_weights is None else \
            {GLOBAL: arrays if received is global_weights else to_arrays(global_weights)}
        evaluated = set(evaluated_clients(self.config))
        nodes = sorted(node for cid, node in self._online(round_index - 1).items() if cid in evaluated)
        replies = self._send(MessageType.EVALUATE, nodes, round_index, arrays,
                             phase="eval", extra=extra, base_load=json.dumps(base_load))
        for _, reply in replies:
            self._keep_detail(reply, round_index)
        return [_record(reply) for _, reply in replies]

    def _keep_detail(self, reply: Message, round_index: int) -> None:
        """The client's per-example files into the run's `evals/`, as the in-process engine keeps them."""
        if DETAIL in reply.content:
            unpack_detail(json.loads(str(reply.content[DETAIL]["files"])), _client(reply), round_index,
                          self.run_dir / EVALS_DIR)

    def commit(self, round_index: int) -> None:
        """Clients learn of a commit from the next message; after the last round, tell them now."""
        if round_index == self.config.rounds:
            self._send(MessageType.QUERY, sorted(self._online(round_index).values()), round_index, None,
                       phase="commit")

    def infos(self) -> list[ClientInfo]:
        """Every client seen so far, late joiners included (for the report)."""
        return self._sorted_infos()

    # ---- nodes ---------------------------------------------------------------------------------
    def _sorted_infos(self) -> list[ClientInfo]:
        return [self._infos[cid] for cid in sorted(self._infos)]

    def _online(self, committed: int) -> dict[int, int]:
        """Client id -> node id of the clients whose SuperNode is online now; a node not seen
        before is asked which client it is (a restarted SuperNode may come back as a new node)."""
        online = set(self.grid.get_node_ids())
        unknown = sorted(online - set(self.nodes.values()))
        if unknown:
            self._identify(unknown, committed)
        return {cid: node for cid, node in self.nodes.items() if node in online}

    def _identify(self, node_ids: list[int], committed: int) -> None:
        online = set(self.grid.get_node_ids())
        for node_id, reply in self._send(MessageType.QUERY, node_ids, committed, None, phase="identify"):
            cid = _client(reply)
            previous = self.nodes.get(cid)
            if previous is not None and previous != node_id and previous in online:
                log.warning("node %d claims client %d, which node %d serves; ignored", node_id, cid, previous)
                continue
            if previous is not None:  # a restarted SuperNode without authentication: a new node id
                log.warning("client %d is back, on node %d (was node %d)", cid, node_id, previous)
            self.nodes[cid] = node_id
            self._infos.setdefault(cid, _info(cid, reply.content["info"]))

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.min_clients:
                return nodes
            if time.monotonic() > deadline:
                raise FlexmoeError(f"only {len(nodes)} of min-clients = {self.min_clients} SuperNodes connected "
                                   f"within {self.connect_timeout:.0f} s")
            time.sleep(1.0)

    # ---- messages ------------------------------------------------------------------------------
    def _send(self, message_type: str, node_ids: list[int], round_index: int, arrays, phase: str = "",
              extra: dict | None = None, base_load: str = "null") -> list[tuple[int, Message]]:
        return self._exchange(message_type, node_ids, round_index, arrays, phase, extra, base_load)[0]

    def _settings(self, message_type: str, round_index: int, phase: str = "", base_load: str = "null") -> dict:
        """The config record of a message: the run's config, the round, the last committed round, and
        every client's counted round keyed by client id: a node the server has not seen yet (a restarted
        SuperNode, every node of a resumed run) only says which client it is when it replies, so it
        looks its own round up."""
        committed = round_index if message_type == MessageType.QUERY else max(round_index - 1, 0)
        return {"flexmoe-config": config_text(self.config), "round": round_index, "committed": committed,
                "run-dir": str(self.run_dir), "phase": phase, "base-load": base_load,
                COUNTED_ROUNDS: counted_rounds_text(self.server.counted)}

    def _exchange(self, message_type: str, node_ids: list[int], round_index: int, arrays, phase: str = "",
                  extra: dict | None = None, base_load: str = "null") -> tuple[list[tuple[int, Message]], dict]:
        """One message per node -> (the successful replies as (node id, reply), in client order, as
        aggregation sums in a fixed order in process too; {client id: why} for each known client
        whose node failed or did not reply within the round timeout, logged and skipped)."""
        clients = {node: cid for cid, node in self.nodes.items()}
        messages = []
        for node_id in node_ids:
            content = RecordDict({CONFIG: ConfigRecord(self._settings(message_type, round_index, phase, base_load))})
            if arrays is not None:
                content[ARRAYS] = arrays
            for key, record in (extra or {}).items():
                content[key] = record
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type,
                                    group_id=str(round_index)))
        replies, errors = [], {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout):
            if reply.has_error():
                # the SuperLink itself answers for a node that went away: name the node we wrote to
                sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
                errors[sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)] = reply.error.reason
            else:
                replies.append((reply.metadata.src_node_id, reply))
        answered = {node for node, _ in replies}
        failures = {}
        for node in node_ids:
            if node not in answered:
                why = errors.get(node, f"no reply within round-timeout = {self.round_timeout:g} s")
                log.warning("round %d %s: client %s (node %d) failed: %s; skipped", round_index, message_type,
                            clients.get(node, "?"), node, why)
                if node in clients:
                    failures[clients[node]] = why
        return sorted(replies, key=lambda item: _client(item[1])), failures


def _client(reply: Message) -> int:
    return int(reply.content[METRICS]["client"])


def _record(reply: Message) -> dict:
    return json.loads(str(reply.content[RESULT]["record"]))


def _info(client_id: int, info) -> ClientInfo:
    fields = json.loads(str(info["describe"]))
    return ClientInfo(**{**fields, "client_id": client_id, "domains": tuple(fields["domains"]),
                         "categories": tuple(fields["categories"]), "skipped": tuple(fields.get("skipped", ()))})
