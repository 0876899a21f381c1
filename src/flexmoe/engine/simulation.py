"""In-process federated simulation.

The frozen base is loaded once; one model instance serves every client in turn: before a
client trains, its shared weights (what the method says it starts from), its personal state
(FLEx graft and gate) and its optimiser state are loaded into that instance, and afterwards
written back under `clients/<id>/`. Messages between server and clients go through
`flexmoe.eval.comm` as real safetensors bytes, which is what communication accounting counts.
The client and server steps themselves are `flexmoe.engine.core`'s, shared with the Flower apps.

Every random choice derives from (seed, round, client), and every round ends with an atomic
checkpoint, so `resume()` continues a killed run to exactly the metrics of an uninterrupted one.
A client that raises is skipped for the round (logged, its pending state dropped); the server
checks every update before aggregating it (`ServerRunner.aggregate`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flexmoe.config import RunConfig, load_config
from flexmoe.engine.core import (
    CONFIG_FILE, Client, ClientRunner, ServerRunner, base_load, base_reference, derived_seed, describe, evaluates,
    load_model, make_client, partition_data, round_lr, sample_clients, shared_params,
)
from flexmoe.engine.progress import Progress
from flexmoe.engine.rundir import ClientStore, is_run_dir
from flexmoe.errors import FlexmoeError
from flexmoe.eval.comm import deserialize, serialize
from flexmoe.eval.detail import EVALS_DIR
from flexmoe.methods import Reply, build_method

__all__ = ["Simulation", "derived_seed", "sample_clients"]


class Simulation:
    """One run directory, from round 0 (or its last checkpoint) to `config.rounds`."""

    def __init__(self, config: RunConfig, run_dir: Path, progress: Progress | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress or Progress()
        self.method = build_method(config)
        self.server = ServerRunner(config, self.method, self.run_dir)
        self.store = ClientStore(self.run_dir / "clients")

    @classmethod
    def resume(cls, run_dir: Path, progress: Progress | None = None, stop_after: int | None = None) -> dict:
        run_dir = Path(run_dir)
        if not is_run_dir(run_dir):
            raise FlexmoeError(f"{run_dir}: not a resumable run directory (no {CONFIG_FILE} or checkpoint)")
        return cls(load_config(run_dir / CONFIG_FILE), run_dir, progress).run(resume=True, stop_after=stop_after)

    # ---- the run ---------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train through `config.rounds` (or stop after round `stop_after`); returns the summary."""
        threads = torch.get_num_threads()
        if self.config.runtime.threads:
            torch.set_num_threads(self.config.runtime.threads)
        try:
            return self._run(resume, stop_after)
        finally:
            torch.set_num_threads(threads)

    def _run(self, resume: bool, stop_after: int | None) -> dict:
        started = time.monotonic()
        self._setup()
        if resume:
            completed = self.server.resume()
            self.store.commit(completed)
        else:
            self._start_fresh()
            completed = 0
        last = min(self.config.rounds, stop_after or self.config.rounds)
        self.progress.start(self.config.rounds, completed + 1)
        try:
            for round_index in range(completed + 1, last + 1):
                self._round(round_index)
        finally:
            self.progress.close()
        summary = self.server.write_summary(time.monotonic() - started)
        self.server.write_report(summary, [describe(c) for c in self.clients])
        return summary

    def _setup(self) -> None:
        self.model, self.tokenizer = load_model(self.config, self.method)
        self.clients = [make_client(self.config, part, self.tokenizer) for part in partition_data(self.config)]
        self.runner = ClientRunner(self.config, self.method, self.model, self.tokenizer, self.store,
                                   self.server.initial_weights, self.progress, detail_dir=self.run_dir / EVALS_DIR)

    def _start_fresh(self) -> None:
        from flexmoe.models import base_fingerprint

        self.server.start(shared_params(self.model), base_fingerprint(self.model))
        # before grafting, with LoRA at zero: the untouched base is the reference
        base_evals = [self.runner.evaluate_base(c) for c in self.clients] if self.config.eval.base else []
        reference = base_reference(self.model, self.tokenizer, self.config, base_evals, self.runner.detail_dir)
        if self.method.grafts:
            for client in self.clients:
                self.runner.graft(client)
        self.server.commit_round_zero([*base_evals, reference])

    # ---- one round -------------------------------------------------------------------------
    def _round(self, round_index: int) -> None:
        cfg = self.config
        sampled = sample_clients(cfg.seed, round_index, cfg.num_clients, cfg.clients_per_round)
        self.progress.round_started(round_index, sampled)
        down = self.server.downlink()
        down_blob = serialize(down) if down is not None else None
        records, replies = [], []
        for client_id in sampled:
            try:
                record, reply = self._train_client(self.clients[client_id], round_index, round_lr(cfg, round_index),
                                                   down_blob)
            except FlexmoeError:  # a user mistake (bad file, bad setting) stops the run with its one line
                raise
            except Exception as error:  # one client's crash must not cost the others their round
                self.server.client_failed(round_index, client_id, error)
                continue
            records.append(record)
            if reply is not None:
                replies.append(reply)
        agg_metrics = self.server.aggregate(replies)
        evals, global_eval = self._evaluate(round_index) if evaluates(cfg, round_index) else ([], {})
        self.server.finish_round(round_index, sampled, records, agg_metrics, evals, global_eval)
        self.store.commit(round_index)
        self.server.write_summary(None)

    def _train_client(self, client: Client, round_index: int, lr: float, down_blob: bytes | None):
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

    def _evaluate(self, round_index: int) -> tuple[list[dict], dict]:
        """Every client's personalised model, then (methods with one) the global model."""
        reference = base_load(self.server.metrics.read())
        received = self.method.eval_received(self.server.global_weights, self.server.server_state)
        evals = [self.runner.evaluate(c, round_index, received, reference) for c in self.clients]
        if not (self.method.communicates and self.config.eval.global_model):
            return evals, {}
        rouge, global_eval = self.runner.evaluate_global(self.clients, round_index, self.server.global_weights,
                                                         reference)
        for record in evals:
            record["rouge_l_global"] = rouge[record["client"]]
        return evals, global_eval
