"""The server's side of a run, the same in both engines: its state (global weights, server-optimiser
state, the last round it counted for each client), the downlink, validated aggregation through the
method's rules, the round's records and checkpoints in the run directory (`rundir.py`).

The round loop is `flexmoe.engine.driver`'s; the clients' side is `flexmoe.engine.client`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flexmoe.config import RunConfig, save_config
from flexmoe.engine import privacy
from flexmoe.engine.validation import split_valid, update_norm
from flexmoe.errors import FlexmoeError
from flexmoe.files import load_checked, one_line, save_checked
from flexmoe.methods.base import Method
from flexmoe.methods.rules import Reply
from flexmoe.tensors import Tensors
from flexmoe.report.summary import eval_means, weighted
from flexmoe.rundir import BASE_METADATA, CONFIG_FILE, INITIAL_WEIGHTS, METRICS_FILE, MetricsLog, load_server, save_server
from flexmoe.tensors import cpu_clone
from flexmoe.train import cosine_lr
from flexmoe.wire import WireError, decode, encode

log = logging.getLogger("flexmoe.engine")


class ServerRunner:
    """The server's state (global weights, server-optimiser state, `counted`) and the run directory.

    `counted`: client id -> the last round of that client the server counted (0: none). Every
    message to a client carries it: a client promotes pending state only of such a round, so the
    state of a round the server counted as failed never becomes final, whatever it missed meanwhile."""

    def __init__(self, config: RunConfig, method: Method, run_dir: Path):
        self.config = config
        self.method = method
        self.run_dir = Path(run_dir)
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE)
        self.global_weights: Tensors = {}
        self.server_state: Tensors = {}
        self._initial: Tensors | None = None
        self.completed = 0  # the last committed round; the round in progress is the next one
        self.counted: dict[int, int] = {}
        self._failures: list[dict] = []  # this round's failed clients, logged with the round

    def start(self, initial_weights: Tensors, base: str | None = None) -> None:
        """A fresh run directory with the resolved config and the round-0 shared weights (tagged
        with the base model's fingerprint `base`, so a changed base is refused when the run is used)."""
        if (self.run_dir / METRICS_FILE).exists():
            raise FlexmoeError(f"{self.run_dir} already holds a run; resume it with --resume or pick another directory")
        save_config(self.config, self.run_dir / CONFIG_FILE)
        self.global_weights = cpu_clone(initial_weights)
        save_checked(self.run_dir / INITIAL_WEIGHTS, self.global_weights, {BASE_METADATA: base} if base else None)
        self.server_state = self.method.init_server_state(self.global_weights)

    def commit_round_zero(self, records: list[dict]) -> None:
        self.metrics.append(records)
        save_server(self.run_dir, 0, self.global_weights, self.server_state)

    def resume(self) -> int:
        """Reload the last committed round; returns its number."""
        completed, self.global_weights, self.server_state = load_server(self.run_dir)
        self.metrics.keep_through(completed)
        self.completed = completed
        for record in self.metrics.read():
            if record["kind"] == "train":
                self.counted[record["client"]] = max(self.counted.get(record["client"], 0), record["round"])
        return completed

    def initial_weights(self) -> Tensors:
        if self._initial is None:
            self._initial = load_checked(self.run_dir / INITIAL_WEIGHTS)[0]
        return self._initial

    def downlink(self) -> Tensors | None:
        """What every sampled client receives this round, in wire form (None: the method sends nothing)."""
        if not self.method.communicates:
            return None
        return encode(self.method.downlink(self.global_weights, self.server_state), self.config.wire)[0]

    def _decoded(self, replies: list[Reply]) -> tuple[list[Reply], list[dict]]:
        """The replies decoded from their wire form (`wire.py`) against what the clients received
        this round; one that cannot be decoded is rejected with the reason."""
        if not self.config.wire.lossy:
            return replies, []
        reference = decode(self.downlink())  # exactly what every client decoded: the same bytes, the same code
        decoded, rejected = [], []
        for reply in replies:
            try:
                decoded.append(Reply(decode(reply.tensors, reference), reply.num_examples, client=reply.client))
            except WireError as error:
                rejected.append({"client": reply.client, "reason": f"undecodable message: {error}"})
        return decoded, rejected

    def trained(self, round_index: int, records: list[dict]) -> None:
        """The clients of these train records count for round `round_index`."""
        for record in records:
            self.counted[record["client"]] = round_index

    def client_failed(self, round_index: int, client_id: int, reason: str) -> None:
        """A sampled client raised, its node went away or it did not answer: the round goes on
        without it. Logged now and as a `"kind": "failure"` record of the round."""
        log.warning("round %d: client %d failed (%s); the round goes on without it", round_index, client_id, reason)
        self._failures.append({"round": round_index, "kind": "failure", "client": client_id, "error": reason})

    def aggregate(self, replies: list[Reply]) -> dict:
        """Aggregate the round in progress: check every reply (engine/validation.py), then combine
        the valid ones, through the differential-privacy release when `privacy.noise_multiplier`
        > 0 (engine/privacy.py). With no valid reply the global model and server state stay."""
        if not self.method.communicates:
            return {}
        round_index = self.completed + 1
        replies, undecodable = self._decoded(replies)
        accepted, rejected = split_valid(self.method, self.config.validation, self.global_weights, replies)
        rejected = undecodable + rejected
        for item in rejected:
            log.warning("round %d: update of client %d rejected: %s", round_index, item["client"], item["reason"])
        agg_metrics = {"rejected": rejected} if rejected else {}
        norms = {str(r.client): update_norm(self.method.reply_update(r.tensors, self.global_weights)) for r in accepted}
        agg_metrics["update_norms"] = norms  # what validation.max_update_norm and privacy.clip_norm are chosen from
        if privacy.enabled(self.config.privacy):
            agg_metrics["dp_epsilon"] = privacy.epsilon(self.config, round_index)
        if not accepted:
            log.warning("round %d: no valid update; the global model is unchanged", round_index)
            return agg_metrics
        if privacy.enabled(self.config.privacy):
            release, dp_metrics = privacy.private_release(self.method, self.global_weights, accepted,
                                                          self.config.privacy, self.config.seed, round_index)
            accepted = [release]
            agg_metrics.update(dp_metrics)
        self.global_weights, self.server_state, method_metrics = self.method.aggregate(
            self.global_weights, self.server_state, accepted)
        return {**method_metrics, **agg_metrics}

    def finish_round(self, round_index: int, sampled: list[int], train_records: list[dict],
                     agg_metrics: dict, evals: list[dict], global_eval: dict | None = None) -> None:
        """Log the round (client records + the server record, with the global model's
        `global_eval` measures) and commit its checkpoint."""
        server = {
            "round": round_index, "kind": "server", "clients": sampled, "lr": cosine_lr(self.config.train, round_index, self.config.rounds),
            "train_loss": weighted([r["loss"] for r in train_records], [r["tokens"] for r in train_records]),
            "bytes_up": sum(r["bytes_up"] for r in train_records),
            "bytes_down": sum(r["bytes_down"] for r in train_records),
            **agg_metrics,
        }
        failures, self._failures = [f for f in self._failures if f["round"] == round_index], []
        if failures:
            server["failed"] = [f["client"] for f in failures]
        if evals:
            server.update(eval_means(evals))
        server.update(global_eval or {})
        self.metrics.append([*train_records, *failures, *evals, server])
        save_server(self.run_dir, round_index, self.global_weights, self.server_state)
        self.completed = round_index


def failure_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)}"
