"""The one round driver of both engines.

It owns the run: round 0 (the untouched base as the reference, grafting), the seeded client
sampling, the evaluation cadence, failures, checkpoints, resume, the summary and the report,
and every measure, the global model's included. Engines only move messages, through the small
`Transport` interface: the in-process engine calls the clients' code directly
(`engine/simulation.py`), the Flower ServerApp sends Flower messages to SuperNodes
(`engine/flower/server_app.py`).

One round: sample → downlink → `transport.train` → validated aggregation → (evaluation round:
`transport.evaluate` + the global model's knowledge here) → log and checkpoint (the commit
point) → `transport.commit` → summary.

The driver tells every client, with each message, the last round of its own that the server
counted (`counted`): a client promotes pending state only of such a round, so the state of a
round the server counted as failed never becomes final, whatever the client missed meanwhile.
"""

from __future__ import annotations

import contextlib

import time
from pathlib import Path
from typing import Protocol

from flexmoe.config import RunConfig
from flexmoe.data.clients import ClientInfo, skipped_rows
from flexmoe.engine.core import (
    ServerRunner, base_knowledge, base_load, base_reference, evaluates, global_knowledge, load_model,
    sample_clients, shared_params, torch_threads,
)
from flexmoe.engine.progress import Progress
from flexmoe.methods import Method, Reply, Tensors, build_method
from flexmoe.models import base_fingerprint
from flexmoe.report import write_run_report
from flexmoe.report.summary import mean, summarize, write_summary
from flexmoe.rundir import EVALS_DIR


class Transport(Protocol):
    """How the driver reaches the clients. `counted`: client id -> the last round of that client
    the server counted (0: none); clients drop pending state of any other round."""

    def round_zero(self, evaluate_base: bool) -> tuple[list[dict], list[ClientInfo]]:
        """Every client: the untouched base on its test split (when `evaluate_base`), then
        grafting (methods that graft) -> (base evaluation records, every client's info)."""

    def resume(self, completed: int, counted: dict[int, int]) -> list[ClientInfo]:
        """Continue after round `completed`: clients drop state of rounds never committed."""

    def train(self, round_index: int, sampled: list[int], downlink: Tensors | None,
              counted: dict[int, int]) -> tuple[list[dict], list[Reply], dict[int, str]]:
        """The sampled clients train -> (their train records with `bytes_up`/`bytes_down`, their
        uploads, {client id: why} for each sampled client that failed)."""

    def evaluate(self, round_index: int, received: Tensors, global_weights: Tensors | None,
                 base_load: dict | None, counted: dict[int, int]) -> list[dict]:
        """Every client's evaluation record (`ClientRunner.evaluate`), in client order."""

    def commit(self, round_index: int, counted: dict[int, int]) -> None:
        """Round `round_index` is committed: clients may promote its pending state."""

    def infos(self) -> list[ClientInfo]:
        """Every client's info as known now (a Flower client that joined late included)."""


class RoundDriver:
    """One run directory, from round 0 (or its last checkpoint) to `config.rounds`."""

    def __init__(self, config: RunConfig, run_dir: Path, transport: Transport, progress: Progress | None = None,
                 method: Method | None = None, model=None, tokenizer=None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.transport = transport
        self.progress = progress or Progress()
        self.method = method or build_method(config)
        self.server = ServerRunner(config, self.method, self.run_dir)
        self._model = (model, tokenizer) if model is not None else None
        self.counted: dict[int, int] = {}
        self.infos: list[ClientInfo] = []
        self.detail_dir = self.run_dir / EVALS_DIR  # the server's own per-item results: base and global knowledge
        self.phase_seconds: dict[str, float] = {}  # wall seconds per phase of this invocation

    @contextlib.contextmanager
    def _phase(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.monotonic() - started

    def model(self):
        """(model, tokenizer) of the server's own: base reference and global-model knowledge."""
        if self._model is None:
            self._model = load_model(self.config, self.method)
        return self._model

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
        model, tokenizer = self.model()
        self.server.start(shared_params(model, self.method), base_fingerprint(model))
        # before any graft: the untouched base
        knowledge = base_knowledge(model, tokenizer, self.config, self.detail_dir)
        base_evals, self.infos = self.transport.round_zero(self.config.eval.base)
        self.server.commit_round_zero([*base_evals, {**base_reference(base_evals, knowledge),
                                                     **skipped_rows(self.infos)}])
        return 0

    def _resume(self) -> int:
        completed = self.server.resume()
        for record in self.server.metrics.read():
            if record["kind"] == "train":
                self.counted[record["client"]] = max(self.counted.get(record["client"], 0), record["round"])
        self.infos = self.transport.resume(completed, dict(self.counted))
        return completed

    def _round(self, round_index: int) -> None:
        cfg = self.config
        sampled = sample_clients(cfg.seed, round_index, cfg.num_clients, cfg.clients_per_round)
        self.progress.round_started(round_index, sampled)
        with self._phase("training"):
            records, replies, failures = self.transport.train(round_index, sampled, self.server.downlink(),
                                                              dict(self.counted))
        for client_id in sorted(failures):
            self.server.client_failed(round_index, client_id, failures[client_id])
        for record in records:
            self.counted[record["client"]] = round_index
        agg_metrics = self.server.aggregate(replies)
        with self._phase("evaluation"):
            evals, global_eval = self._evaluate(round_index) if evaluates(cfg, round_index) else ([], {})
        self.server.finish_round(round_index, sampled, records, agg_metrics, evals, global_eval)
        self.transport.commit(round_index, dict(self.counted))
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
                                        reference, dict(self.counted))
        if not (with_global and evals):
            return evals, {}
        model, tokenizer = self.model()
        self.progress.message(f"round {round_index}: evaluating the global model")
        global_eval = global_knowledge(model, tokenizer, self.config, self.method, server.global_weights, reference,
                                       round_index, self.detail_dir)
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
