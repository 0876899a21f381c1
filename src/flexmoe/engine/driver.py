"""The one round driver of both engines, and the schedule it keeps.

It owns the run: round 0 (the untouched base as the reference, grafting), the seeded client
sampling, the evaluation cadence, failures, checkpoints, resume, the summary and the report,
and the global model's measures. The server's state is the `ServerRunner` it is handed
(`engine/server.py`); engines only move messages, through the small `Transport` interface: the
in-process engine calls the clients' code directly (`engine/simulation.py`), the Flower ServerApp
sends Flower messages to SuperNodes (`engine/flower/server_app.py`). A transport that needs the
server's `counted` rounds (Flower's messages carry them) is handed the same server.

One round: sample → downlink → `transport.train` → validated aggregation → (evaluation round:
`transport.evaluate` + the global model's knowledge here) → log and checkpoint (the commit
point) → `transport.commit` → summary.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import numpy as np

from flexmoe.config import RunConfig
from flexmoe.clients import ClientInfo, skipped_rows
from flexmoe.engine.evaluator import Evaluator, base_load, base_reference
from flexmoe.engine.model import load_model, shared_params, torch_threads
from flexmoe.engine.progress import Progress
from flexmoe.engine.server import ServerRunner
from flexmoe.methods.rules import Reply
from flexmoe.tensors import Tensors
from flexmoe.models import base_fingerprint
from flexmoe.report import write_run_report
from flexmoe.report.summary import mean, summarize, write_summary
from flexmoe.rundir import EVALS_DIR


# ---- the schedule ---------------------------------------------------------------------------
def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of a round: a seeded draw without replacement, a function of (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def evaluated_clients(config: RunConfig) -> list[int]:
    """The clients every evaluated round evaluates: all of them, or `eval.clients` of them drawn
    once from the seed (the same every round, so rounds and methods compare on the same clients)."""
    count = config.eval.clients
    if count == 0 or count >= config.num_clients:
        return list(range(config.num_clients))
    rng = np.random.default_rng([config.seed, 0xE7A1])
    return sorted(int(c) for c in rng.choice(config.num_clients, size=count, replace=False))


def evaluates(config: RunConfig, round_index: int) -> bool:
    every = config.eval.every
    return round_index == config.rounds or (every > 0 and round_index % every == 0)


# ---- the driver -----------------------------------------------------------------------------
class Transport(Protocol):
    """How the driver reaches the clients."""

    def round_zero(self, evaluate_base: bool) -> tuple[list[dict], list[ClientInfo]]:
        """Every evaluated client: the untouched base on its test split (when `evaluate_base`),
        then grafting (methods that graft) -> (base evaluation records, every client's info)."""

    def resume(self, completed: int) -> list[ClientInfo]:
        """Continue after round `completed`: clients drop state of rounds never committed."""

    def train(self, round_index: int, sampled: list[int],
              downlink: Tensors | None) -> tuple[list[dict], list[Reply], dict[int, str]]:
        """The sampled clients train -> (their train records with `bytes_up`/`bytes_down`, their
        uploads, {client id: why} for each sampled client that failed)."""

    def evaluate(self, round_index: int, received: Tensors, global_weights: Tensors | None,
                 base_load: dict | None) -> list[dict]:
        """Every evaluated client's record (`ClientRunner.evaluate`), in client order."""

    def commit(self, round_index: int) -> None:
        """Round `round_index` is committed: clients may promote its pending state."""

    def infos(self) -> list[ClientInfo]:
        """Every client's info as known now (a Flower client that joined late included)."""


class RoundDriver:
    """One run directory (the `server`'s), from round 0 (or its last checkpoint) to `config.rounds`."""

    def __init__(self, server: ServerRunner, transport: Transport, progress: Progress | None = None,
                 model=None, tokenizer=None):
        self.server = server
        self.config = server.config
        self.method = server.method
        self.run_dir = server.run_dir
        self.transport = transport
        self.progress = progress or Progress()
        self._evaluator = Evaluator(self.config, model, tokenizer, self.method.roles, self._detail_dir()) \
            if model is not None else None
        self.infos: list[ClientInfo] = []
        self.phase_seconds: dict[str, float] = {}  # wall seconds per phase of this invocation

    def _detail_dir(self):
        return self.run_dir / EVALS_DIR  # the server's own per-item results: base and global knowledge

    @contextlib.contextmanager
    def _phase(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.monotonic() - started

    def evaluator(self) -> Evaluator:
        """The evaluator on the server's own model: base reference and global-model knowledge."""
        if self._evaluator is None:
            model, tokenizer = load_model(self.config, self.method)
            self._evaluator = Evaluator(self.config, model, tokenizer, self.method.roles, self._detail_dir())
        return self._evaluator

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train through `config.rounds` (or stop after round `stop_after`); returns the summary."""
        with torch_threads(self.config):
            started = time.monotonic()
            with self._phase("setup and round 0"):
                completed = self._resume() if resume else self._start()
            last = min(self.config.rounds, stop_after or self.config.rounds)
            self.progress.start(self.config.rounds, completed + 1)
            try:
                for round_index in range(completed + 1, last + 1):
                    self._round(round_index)
            finally:
                self.progress.close()
            return self._finish(time.monotonic() - started)

    def _start(self) -> int:
        evaluator = self.evaluator()
        self.server.start(shared_params(evaluator.model, self.method), base_fingerprint(evaluator.model))
        knowledge = evaluator.base_knowledge()  # before any graft: the untouched base
        base_evals, self.infos = self.transport.round_zero(self.config.eval.base)
        self.server.commit_round_zero([*base_evals, {**base_reference(base_evals, knowledge),
                                                     **skipped_rows(self.infos)}])
        return 0

    def _resume(self) -> int:
        completed = self.server.resume()
        self.infos = self.transport.resume(completed)
        return completed

    def _round(self, round_index: int) -> None:
        cfg = self.config
        sampled = sample_clients(cfg.seed, round_index, cfg.num_clients, cfg.clients_per_round)
        self.progress.round_started(round_index, sampled)
        with self._phase("training"):
            records, replies, failures = self.transport.train(round_index, sampled, self.server.downlink())
        for client_id in sorted(failures):
            self.server.client_failed(round_index, client_id, failures[client_id])
        self.server.trained(round_index, records)
        agg_metrics = self.server.aggregate(replies)
        with self._phase("evaluation"):
            evals, global_eval = self._evaluate(round_index) if evaluates(cfg, round_index) else ([], {})
        self.server.finish_round(round_index, sampled, records, agg_metrics, evals, global_eval)
        self.transport.commit(round_index)
        write_summary(self.run_dir, summarize(self.server.metrics.read(), cfg, None, self.run_dir))

    def _evaluate(self, round_index: int) -> tuple[list[dict], dict]:
        """Every client's personalised model (and, methods with one, the global model on its test
        split), then the global model's knowledge measures, once."""
        server = self.server
        reference = base_load(server.metrics.read())
        # a method that communicates nothing sends nothing: its clients start from their initial weights
        received = self.method.eval_received(server.global_weights, server.server_state) \
            if self.method.communicates else {}
        with_global = self.method.communicates and self.config.eval.global_model
        evals = self.transport.evaluate(round_index, received, server.global_weights if with_global else None,
                                        reference)
        if not (with_global and evals):
            return evals, {}
        self.progress.message(f"round {round_index}: evaluating the global model")
        global_eval = self.evaluator().global_knowledge(server.global_weights, reference, round_index)
        global_eval["global_rouge_l_avg"] = mean([e["rouge_l_global"] for e in evals])
        return evals, global_eval

    def _finish(self, wall_seconds: float) -> dict:
        """The summary (written, with the report); it also carries this invocation's `phase_seconds`
        (the setup and round 0, training, evaluation, and the report), which summary.json does not."""
        summary = summarize(self.server.metrics.read(), self.config, wall_seconds, self.run_dir)
        write_summary(self.run_dir, summary)
        with self._phase("report"):
            write_run_report(self.run_dir, self.transport.infos())
        return {**summary, "phase_seconds": dict(self.phase_seconds)}
