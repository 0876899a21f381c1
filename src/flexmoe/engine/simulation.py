"""In-process federated simulation.

The frozen base is loaded once; one model instance serves every client in turn: before a
client trains, its shared weights (what the method says it starts from), its personal state
(FLEx graft and gate) and its optimiser state are loaded into that instance, and afterwards
written back under `clients/<id>/`. Messages between server and clients go through
`flexmoe.eval.comm` as real safetensors bytes, which is what communication accounting counts.

Every random choice derives from (seed, round, client), and every round ends with an atomic
checkpoint, so `resume()` continues a killed run to exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from flexmoe.config import RunConfig, load_config, save_config
from flexmoe.engine.progress import Progress
from flexmoe.engine.rundir import (
    ClientStore, MetricsLog, cpu_clone, is_run_dir, load_server, save_server, save_tensors_atomic, write_text_atomic,
)
from flexmoe.errors import FlexmoeError
from flexmoe.eval.comm import deserialize, serialize
from flexmoe.methods import LocalRun, Reply, Tensors, build_method
from flexmoe.methods.base import strip_prefix, with_prefix
from flexmoe.train import cosine_lr, local_train
from flexmoe.train.loop import num_local_steps

CONFIG_FILE = "config.toml"
INITIAL_WEIGHTS = "checkpoints/initial.safetensors"  # round-0 shared weights: Local clients start there


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of a round: a seeded draw without replacement, a function of (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclass
class Client:
    client_id: int
    train: list
    test: list
    features: list[dict]


class Simulation:
    """One run directory, from round 0 (or its last checkpoint) to `config.rounds`."""

    def __init__(self, config: RunConfig, run_dir: Path, progress: Progress | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress or Progress()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.store = ClientStore(self.run_dir / "clients")
        self.method = build_method(config)
        self._initial: Tensors | None = None

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
            completed, self.global_weights, self.server_state = load_server(self.run_dir)
            self.metrics.keep_through(completed)
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
        summary = self._write_summary(time.monotonic() - started)
        from flexmoe.engine.report import write_report

        write_report(self.run_dir, summary, self.metrics.read(), self.clients)
        return summary

    def _setup(self) -> None:
        from flexmoe.data import tokenize_examples
        from flexmoe.models import load_base

        cfg = self.config
        self.model, self.tokenizer = load_base(cfg.model)
        parts = self._partition()
        self.clients = []
        for part in parts:
            train = part.train[: cfg.data.max_train_per_client or None]
            features = tokenize_examples(train, self.tokenizer, max_length=cfg.train.max_length,
                                         template=cfg.data.template)
            self.clients.append(Client(part.client_id, train, part.test, features))
        torch.manual_seed(cfg.seed)  # LoRA initialisation: identical on every client
        self.model = self.method.prepare_model(self.model)
        self.model.eval()

    def _partition(self):
        import flexmoe.data

        data = self.config.data
        if data.source == "builtin":
            examples = flexmoe.data.builtin_examples()
        else:
            examples = flexmoe.data.load_examples(data.source, format=None if data.format == "auto" else data.format)
        parts = flexmoe.data.partition(
            examples, self.config.num_clients, scheme=data.partition, by=data.by, per_client=data.per_client,
            alpha=data.alpha, seed=self.config.seed, test_fraction=data.test_fraction,
        )
        for part in parts:
            if not part.train:
                raise FlexmoeError(
                    f"client {part.client_id} got no training examples (data.partition = {data.partition!r}, "
                    f"num_clients = {self.config.num_clients}); use fewer clients or another partition"
                )
        return parts

    def _start_fresh(self) -> None:
        if (self.run_dir / "metrics.jsonl").exists():
            raise FlexmoeError(f"{self.run_dir} already holds a run; resume it with --resume or pick another directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.run_dir / CONFIG_FILE)
        base_evals, reference = self._base_reference()  # before grafting, with LoRA at zero: the base
        if self.method.grafts:
            self._graft_all_clients()
        self.global_weights = cpu_clone(self._shared_params())
        save_tensors_atomic(self.run_dir / INITIAL_WEIGHTS, self.global_weights)
        self.server_state = self.method.init_server_state(self.global_weights)
        self.metrics.append([*base_evals, {"round": 0, "kind": "server", **reference}])
        save_server(self.run_dir, 0, self.global_weights, self.server_state)

    def _graft_all_clients(self) -> None:
        """FLEx step 2, once per client before its first round: select, graft, store."""
        from flexmoe.models import save_personal

        cfg = self.config
        for client in self.clients:
            self.progress.message(f"grafting client {client.client_id}")
            sample = client.features[: cfg.flex.calibration_examples]
            calibration = [self._collate(sample[i : i + cfg.train.batch_size])  # padding is masked out
                           for i in range(0, len(sample), cfg.train.batch_size)]
            selection = self.method.personalize(self.model, calibration, seed=derived_seed(cfg.seed, client.client_id))
            self.store.save_selection(client.client_id, selection)
            save_personal(self.model, self.store.dir(client.client_id) / "personal.safetensors")

    def _base_reference(self) -> tuple[list[dict], dict]:
        """The untouched base on every client's test split (ROUGE-L) and on the held-out corpus
        (knowledge loss, routing): the reference every method is compared with."""
        ev = self.config.eval
        evals = [{"round": 0, "kind": "eval", "client": c.client_id, "rouge_l": self._rouge(c)}
                 for c in self.clients] if ev.base else []
        reference = {"rouge_l_avg_base": _mean([e["rouge_l"] for e in evals])} if evals else {}
        if ev.knowledge:
            loss, routing = self._knowledge(self.model)
            reference.update({"knowledge_loss_base": loss, **{f"{k}_base": v for k, v in routing.items()}})
        return evals, reference

    # ---- one round -------------------------------------------------------------------------
    def _round(self, round_index: int) -> None:
        cfg = self.config
        sampled = sample_clients(cfg.seed, round_index, cfg.num_clients, cfg.clients_per_round)
        self.progress.round_started(round_index, sampled)
        lr = cosine_lr(cfg.train, round_index, cfg.rounds)
        down_blob = serialize(self.method.downlink(self.global_weights, self.server_state)) \
            if self.method.communicates else None
        records, replies = [], []
        for client_id in sampled:
            record, reply = self._train_client(self.clients[client_id], round_index, lr, down_blob)
            records.append(record)
            if reply is not None:
                replies.append(reply)
        if self.method.communicates:
            self.global_weights, self.server_state, agg_metrics = self.method.aggregate(
                self.global_weights, self.server_state, replies)
        else:
            agg_metrics = {}
        server = {
            "round": round_index, "kind": "server", "clients": sampled, "lr": lr,
            "train_loss": _weighted([r["loss"] for r in records], [r["tokens"] for r in records]),
            "bytes_up": sum(r["bytes_up"] for r in records), "bytes_down": sum(r["bytes_down"] for r in records),
            **agg_metrics,
        }
        if self._evaluates(round_index):
            evals = [self._evaluate_client(c, round_index) for c in self.clients]
            records.extend(evals)
            server.update(_eval_means(evals))
        self.metrics.append([*records, server])
        save_server(self.run_dir, round_index, self.global_weights, self.server_state)
        self.store.commit(round_index)
        self._write_summary(None)

    def _evaluates(self, round_index: int) -> bool:
        every = self.config.eval.every
        return round_index == self.config.rounds or (every > 0 and round_index % every == 0)

    def _train_client(self, client: Client, round_index: int, lr: float, down_blob: bytes | None):
        cfg, cid = self.config, client.client_id
        received = deserialize(down_blob)[0] if down_blob is not None else {}
        stored = self.store.load_state(cid)
        optimizer_state = strip_prefix("optim.", stored)
        client_state = {k: v for k, v in stored.items() if not k.startswith("optim.")}
        self._load_personal(cid)
        initial = self._initial_shared()
        self._set_shared(self.method.start_weights(received, client_state, initial))
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        steps = num_local_steps(cfg.train, len(client.features))
        self.progress.client_started(cid, steps)
        result = local_train(
            self.model, params, client.features, self._collate, cfg.train, lr,
            seed=derived_seed(cfg.seed, round_index, cid), hooks=self.method.train_hooks(received, client_state),
            optimizer_state=optimizer_state, on_step=self.progress.step,
        )
        trained = cpu_clone(self._shared_params())
        run = LocalRun(steps=result.steps, lr=lr, num_examples=len(client.features))
        message, client_state = self.method.uplink(received, trained, client_state, run)
        reply, bytes_up = None, 0
        if self.method.communicates:
            up_blob = serialize(message, {"num_examples": str(run.num_examples)})
            bytes_up = len(up_blob)
            tensors, meta = deserialize(up_blob)
            reply = Reply(tensors, int(meta["num_examples"]))
        self._save_client(cid, round_index, client_state, result.optimizer_state)
        self.progress.client_done(cid, result.loss)
        record = {
            "round": round_index, "kind": "train", "client": cid, "loss": result.loss, "steps": result.steps,
            "tokens": result.tokens, "num_examples": run.num_examples, "lr": lr,
            "bytes_up": bytes_up, "bytes_down": len(down_blob) if down_blob is not None else 0,
        }
        return record, reply

    def _save_client(self, cid: int, round_index: int, client_state: Tensors, optimizer_state: Tensors) -> None:
        pending = self.store.begin(cid)
        save_tensors_atomic(pending / "state.safetensors", {**client_state, **with_prefix("optim.", optimizer_state)})
        if self.method.grafts:
            from flexmoe.models import save_personal

            save_personal(self.model, pending / "personal.safetensors")
        self.store.finish(cid, round_index)

    # ---- evaluation ------------------------------------------------------------------------
    def _evaluate_client(self, client: Client, round_index: int) -> dict:
        cfg, cid = self.config, client.client_id
        client_state = {k: v for k, v in self.store.load_state(cid).items() if not k.startswith("optim.")}
        self._load_personal(cid)
        self._set_shared(self.method.eval_weights(self.global_weights, client_state))
        self.progress.message(f"round {round_index}: evaluating client {cid}")
        record = {"round": round_index, "kind": "eval", "client": cid, "rouge_l": self._rouge(client)}
        if cfg.eval.knowledge:
            record["knowledge_loss"], routing = self._knowledge(self.model)
            record.update(routing)
        return record

    def _rouge(self, client: Client) -> float:
        from flexmoe.eval.rouge import personalized_rouge_l

        cfg = self.config
        return personalized_rouge_l(
            self.model, self.tokenizer, client.test, max_examples=cfg.eval.max_test_examples,
            template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
            max_prompt_length=cfg.train.max_length,
        )

    def _knowledge(self, model: nn.Module) -> tuple[float, dict]:
        """Held-out LM loss on the builtin held-out corpus, plus routing statistics on it."""
        from flexmoe.data import builtin_corpus
        from flexmoe.eval.knowledge import heldout_loss

        ev = self.config.eval
        docs = builtin_corpus("heldout")[: ev.knowledge_max_docs]
        loss = heldout_loss(model, self.tokenizer, docs, ev.knowledge_max_length, ev.batch_size)
        return loss, self._routing(model, docs) if ev.routing else {}

    def _routing(self, model: nn.Module, docs: list[str]) -> dict:
        """Expert-load std and routing entropy (nats), averaged over MoE layers, padding excluded."""
        from flexmoe.eval.routing import RoutingCounter

        ev = self.config.eval
        with RoutingCounter(model) as counter:
            for start in range(0, len(docs), ev.batch_size):
                enc = self.tokenizer(docs[start : start + ev.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=ev.knowledge_max_length)
                counter.observe(enc["input_ids"], enc["attention_mask"])
        names = [layer.name for layer in counter.layers]
        return {
            "expert_load_std": _mean([counter.load_std(n) for n in names]),
            "routing_entropy": _mean([counter.entropy(n) for n in names]),
        }

    # ---- model state -----------------------------------------------------------------------
    def _shared_params(self) -> dict[str, nn.Parameter]:
        from flexmoe.models import split_parameters

        return split_parameters(self.model).shared

    def _initial_shared(self) -> Tensors:
        """The seeded initial shared weights (the round-0 global), as every client builds them."""
        if self._initial is None:
            self._initial = load_file(str(self.run_dir / INITIAL_WEIGHTS))
        return self._initial

    def _set_shared(self, weights: Tensors) -> None:
        from flexmoe.models import set_shared_state

        set_shared_state(self.model, weights)

    def _load_personal(self, cid: int) -> None:
        if not self.method.grafts:
            return
        from flexmoe.models import load_personal

        load_personal(self.model, self.store.latest(cid, "personal.safetensors"), adopt_selection=True)

    def _collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        from flexmoe.data import collate

        return collate(features, self.tokenizer.pad_token_id)

    # ---- summary ---------------------------------------------------------------------------
    def _write_summary(self, wall_seconds: float | None) -> dict:
        records = self.metrics.read()
        servers = [r for r in records if r["kind"] == "server" and r["round"] > 0]
        evaluated = [r for r in servers if "rouge_l_avg" in r]
        last_eval = evaluated[-1] if evaluated else {}
        base = next((r for r in records if r["round"] == 0 and r["kind"] == "server"), {})
        summary = {
            "method": self.config.method,
            "seed": self.config.seed,
            "rounds": self.config.rounds,
            "rounds_completed": servers[-1]["round"] if servers else 0,
            "num_clients": self.config.num_clients,
            "rouge_l_avg": last_eval.get("rouge_l_avg"),
            "knowledge_loss": last_eval.get("knowledge_loss"),
            "rouge_l_avg_base": base.get("rouge_l_avg_base"),
            "knowledge_loss_base": base.get("knowledge_loss_base"),
            "expert_load_std": last_eval.get("expert_load_std"),
            "routing_entropy": last_eval.get("routing_entropy"),
            "bytes_up": sum(r["bytes_up"] for r in servers),
            "bytes_down": sum(r["bytes_down"] for r in servers),
            "train_loss": servers[-1]["train_loss"] if servers else None,
            "per_client": _per_client(records),
        }
        if wall_seconds is not None:
            summary["wall_seconds"] = round(wall_seconds, 2)
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return summary


def _weighted(values: list[float], weights: list[int]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else float("nan")


def _eval_means(evals: list[dict]) -> dict:
    out = {"rouge_l_avg": _mean([e["rouge_l"] for e in evals])}
    for key in ("knowledge_loss", "expert_load_std", "routing_entropy"):
        values = [e[key] for e in evals if key in e]
        if values:
            out[key] = _mean(values)
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _per_client(records: list[dict]) -> dict[str, dict]:
    """Per client: last ROUGE-L / knowledge loss and total bytes."""
    table: dict[str, dict] = {}
    for r in records:
        if r["kind"] == "train":
            row = table.setdefault(str(r["client"]), {"bytes_up": 0, "bytes_down": 0, "rounds_trained": 0})
            row["bytes_up"] += r["bytes_up"]
            row["bytes_down"] += r["bytes_down"]
            row["rounds_trained"] += 1
        elif r["kind"] == "eval" and r["round"] == 0:
            table.setdefault(str(r["client"]), {"bytes_up": 0, "bytes_down": 0, "rounds_trained": 0})
            table[str(r["client"])]["rouge_l_base"] = r["rouge_l"]
        elif r["kind"] == "eval":
            row = table.setdefault(str(r["client"]), {"bytes_up": 0, "bytes_down": 0, "rounds_trained": 0})
            row["rouge_l"] = r["rouge_l"]
            for key in ("knowledge_loss", "expert_load_std", "routing_entropy"):
                if key in r:
                    row[key] = r[key]
    return table
