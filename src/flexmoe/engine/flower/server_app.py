"""The flexmoe ServerApp: `flexmoe.engine.core`'s server step driving ClientApps over a Flower Grid.

The round loop is the in-process engine's: the same seeded client sampling, the method's own
downlink and aggregation (only the shared keys travel; FLEx's graft never leaves a client), the
same run directory, `metrics.jsonl`, `summary.json`, checkpoints and report. Bytes are those of
the Flower messages' ArrayRecords (see `messages`).

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
authentication is on) is asked which client it is and takes that client's place.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from flexmoe.engine.flower.messages import (
    ARRAYS, CONFIG, GLOBAL, METRICS, RESULT, config_text, from_arrays, parse_overrides, record_bytes, to_arrays,
)
from flexmoe.engine.core import CONFIG_FILE
from flexmoe.errors import FlexmoeError

app = ServerApp()
log = logging.getLogger("flexmoe.flower")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from flexmoe.config import load_config

    settings = context.run_config
    resume = bool(settings.get("resume", False))
    if resume:
        run_dir = _resumable(settings)
        config = load_config(run_dir / CONFIG_FILE)
    else:
        config = load_config(str(settings["config"]) or None, parse_overrides(str(settings.get("set", ""))))
        run_dir = Path(str(settings["output-dir"]) or f"runs/flower-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    FlowerServer(grid, config, run_dir.resolve(), round_timeout=float(settings["round-timeout"]),
                 min_clients=int(settings["min-clients"]) or config.num_clients,
                 connect_timeout=float(settings["connect-timeout"])).run(resume)


def _resumable(settings) -> Path:
    from flexmoe.engine.rundir import is_run_dir

    if str(settings.get("config", "")) or str(settings.get("set", "")):
        raise FlexmoeError("run config: resume=true continues the run with its own config; leave 'config' and 'set' empty")
    if not str(settings["output-dir"]):
        raise FlexmoeError("run config: resume=true needs output-dir, the run directory to continue")
    run_dir = Path(str(settings["output-dir"]))
    if not is_run_dir(run_dir):
        raise FlexmoeError(f"{run_dir}: not a resumable run directory (no {CONFIG_FILE} or checkpoint)")
    return run_dir


class FlowerServer:
    """One run: round 0 (base reference, grafting, client discovery), then `config.rounds` rounds."""

    def __init__(self, grid: Grid, config, run_dir: Path, round_timeout: float, min_clients: int,
                 connect_timeout: float):
        from flexmoe.engine.core import ServerRunner
        from flexmoe.methods import build_method

        self.grid = grid
        self.config = config
        self.run_dir = run_dir
        self.round_timeout = round_timeout
        self.min_clients = min_clients
        self.connect_timeout = connect_timeout
        self.method = build_method(config)
        self.server = ServerRunner(config, self.method, run_dir)
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.failed_round: dict[int, int] = {}  # client id -> the last round its training failed
        self.infos = []

    def run(self, resume: bool = False) -> dict:
        import torch

        from flexmoe.engine.core import evaluates

        started = time.monotonic()
        if self.config.runtime.threads:
            torch.set_num_threads(self.config.runtime.threads)
        completed = self._resume() if resume else self._start()
        for round_index in range(completed + 1, self.config.rounds + 1):
            sampled, records, agg_metrics = self._train_round(round_index)
            evals, global_eval = self._evaluate(round_index) if evaluates(self.config, round_index) else ([], {})
            self.server.finish_round(round_index, sampled, records, agg_metrics, evals, global_eval)
            self.server.write_summary(None)
        # the last round is committed: clients promote their pending state
        self._send(MessageType.QUERY, sorted(self._online(self.config.rounds).values()), self.config.rounds, None,
                   phase="commit")
        summary = self.server.write_summary(time.monotonic() - started)
        self.server.write_report(summary, self.infos)
        log.info("flexmoe: %d rounds done, run directory %s", self.config.rounds, self.run_dir)
        return summary

    def _start(self) -> int:
        from flexmoe.engine.core import load_model, shared_params
        from flexmoe.models import base_fingerprint

        model, tokenizer = load_model(self.config, self.method)
        self.server.start(shared_params(model), base_fingerprint(model))
        self._round_zero(model, tokenizer)
        return 0

    def _resume(self) -> int:
        """Reload the last committed round; every node says which client it is and drops the
        state of the round that never committed."""
        completed = self.server.resume()
        self.failed_round = {r["client"]: r["round"] for r in self.server.metrics.read() if r["kind"] == "failure"}
        self._identify(self._wait_for_nodes(), completed)
        log.info("flexmoe: resuming %s after round %d", self.run_dir, completed)
        return completed

    def _online(self, committed: int) -> dict[int, int]:
        """Client id -> node id of the clients whose SuperNode is online now; a node not seen
        before is asked which client it is (a restarted SuperNode may come back as a new node)."""
        online = set(self.grid.get_node_ids())
        unknown = sorted(online - set(self.nodes.values()))
        if unknown:
            self._identify(unknown, committed)
        return {cid: node for cid, node in self.nodes.items() if node in online}

    def _identify(self, node_ids: list[int], committed: int) -> None:
        from flexmoe.engine.core import ClientInfo

        online = set(self.grid.get_node_ids())
        for node_id, reply in self._send(MessageType.QUERY, node_ids, committed, None, phase="identify"):
            cid, info = _client(reply), reply.content["info"]
            previous = self.nodes.get(cid)
            if previous is not None and previous != node_id and previous in online:
                log.warning("node %d claims client %d, which node %d serves; ignored", node_id, cid, previous)
                continue
            if previous is not None:  # a restarted SuperNode without authentication: a new node id
                log.warning("client %d is back, on node %d (was node %d)", cid, node_id, previous)
            self.nodes[cid] = node_id
            if all(i.client_id != cid for i in self.infos):
                self.infos.append(ClientInfo(cid, tuple(info["domains"]), int(info["num-train"]), int(info["num-test"])))
                self.infos.sort(key=lambda i: i.client_id)

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

    def _round_zero(self, model, tokenizer) -> None:
        """Every node evaluates the untouched base, grafts, and says which client it is."""
        from flexmoe.engine.core import ClientInfo, base_reference

        replies = self._send(MessageType.EVALUATE, self._wait_for_nodes(), 0, None, phase="base")
        base_evals = []
        for node_id, reply in replies:
            cid, record, info = _client(reply), _record(reply), reply.content["info"]
            if cid in self.nodes:
                raise FlexmoeError(f"two SuperNodes claim partition-id {cid}")
            self.nodes[cid] = node_id
            self.infos.append(ClientInfo(cid, tuple(info["domains"]), int(info["num-train"]), int(info["num-test"])))
            if record:
                base_evals.append(record)
        self.infos.sort(key=lambda i: i.client_id)
        base_evals.sort(key=lambda r: r["client"])
        self.server.commit_round_zero([*base_evals, base_reference(model, tokenizer, self.config, base_evals)])

    def _train_round(self, round_index: int) -> tuple[list[int], list[dict], dict]:
        """The sampled clients train; one that fails, is gone or does not answer within the round
        timeout is reported to the server (`ServerRunner.client_failed`, as in process) and the round
        aggregates the rest, through the server's update validation."""
        from flexmoe.engine.core import sample_clients
        from flexmoe.methods import Reply

        cfg = self.config
        sampled = sample_clients(cfg.seed, round_index, cfg.num_clients, cfg.clients_per_round)
        online = self._online(round_index - 1)
        down = self.server.downlink()
        arrays = to_arrays(down) if down is not None else None
        bytes_down = record_bytes(arrays) if arrays is not None else 0
        replies, failures = self._exchange(MessageType.TRAIN, [online[c] for c in sampled if c in online],
                                           round_index, arrays)
        failures.update({c: "no SuperNode of this client is online" for c in sampled if c not in online})
        for client in sorted(failures):
            self.server.client_failed(round_index, client, ClientFailed(failures[client]))
            self.failed_round[client] = round_index
        records, uploads = [], []
        for _, reply in replies:
            record = _record(reply)
            record["bytes_down"] = bytes_down
            record["bytes_up"] = record_bytes(reply.content[ARRAYS]) if ARRAYS in reply.content else 0
            records.append(record)
            if ARRAYS in reply.content:
                uploads.append(Reply(from_arrays(reply.content[ARRAYS]), int(reply.content[METRICS]["num-examples"]),
                                     client=record["client"]))
        return sampled, records, self.server.aggregate(uploads)

    def _evaluate(self, round_index: int) -> tuple[list[dict], dict]:
        """Every client's personalised model and (methods with one) the global model, as the
        in-process engine evaluates them, each on the client that holds the test split."""
        from flexmoe.engine.core import base_load, mean

        server = self.server
        received = self.method.eval_received(server.global_weights, server.server_state)
        arrays = to_arrays(received) if self.method.communicates else None
        with_global = self.method.communicates and self.config.eval.global_model
        extra = {GLOBAL: arrays if received is server.global_weights else to_arrays(server.global_weights)} \
            if with_global else {}
        replies = self._send(MessageType.EVALUATE, sorted(self._online(round_index - 1).values()), round_index, arrays,
                             phase="eval",
                             extra=extra, base_load=json.dumps(base_load(server.metrics.read())))
        evals = [_record(reply) for _, reply in replies]
        if not with_global or not replies:
            return evals, {}
        global_records = [json.loads(str(reply.content["global"]["record"])) for _, reply in replies]
        for record, global_record in zip(evals, global_records):
            record["rouge_l_global"] = global_record.pop("rouge_l")
        # the global model's knowledge measures are the same on every client: take the first's
        global_eval = {**global_records[0], "global_rouge_l_avg": mean([r["rouge_l_global"] for r in evals])}
        return evals, global_eval

    def _send(self, message_type: str, node_ids: list[int], round_index: int, arrays, phase: str = "",
              extra: dict | None = None, base_load: str = "null") -> list[tuple[int, Message]]:
        return self._exchange(message_type, node_ids, round_index, arrays, phase, extra, base_load)[0]

    def _exchange(self, message_type: str, node_ids: list[int], round_index: int, arrays, phase: str = "",
                  extra: dict | None = None, base_load: str = "null") -> tuple[list[tuple[int, Message]], dict]:
        """One message per node -> (the successful replies as (node id, reply), in client order, as
        aggregation sums in a fixed order in process too; {client id: why} for each known client
        whose node failed or did not reply within the round timeout, logged and skipped)."""
        committed = round_index if message_type == MessageType.QUERY else max(round_index - 1, 0)
        settings = {"flexmoe-config": config_text(self.config), "round": round_index, "committed": committed,
                    "run-dir": str(self.run_dir), "phase": phase, "base-load": base_load}
        clients = {node: cid for cid, node in self.nodes.items()}
        messages = []
        for node_id in node_ids:
            failed = self.failed_round.get(clients.get(node_id, -1), -1)
            content = RecordDict({CONFIG: ConfigRecord({**settings, "failed-round": failed})})
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


class ClientFailed(Exception):
    """A client's ClientApp raised, its SuperNode went away, or it did not answer in time."""


def _client(reply: Message) -> int:
    return int(reply.content[METRICS]["client"])


def _record(reply: Message) -> dict:
    return json.loads(str(reply.content[RESULT]["record"]))
