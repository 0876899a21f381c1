"""The engine-agnostic core of a federated run: the client side and the server side of a round.

Engines are thin shells over these pieces and differ only in transport: the in-process engine
runs every client on one model instance and passes safetensors blobs; the Flower apps run each
client in its own process and pass Flower messages. Both call the same `ClientRunner` (load a
client's personal and persistent state, graft before its first round, train, build the uplink,
evaluate) and `ServerRunner` (downlink, aggregation, checkpoints, metrics, summary, report), and
through them the same `flexmoe.methods` code.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexmoe.config import RunConfig, save_config
from flexmoe.engine.progress import Progress
from flexmoe.engine.rundir import (
    ClientStore, MetricsLog, cpu_clone, load_server, save_server,
)
from flexmoe.errors import FlexmoeError
from flexmoe.eval.detail import knowledge_round, pooled_means
from flexmoe.eval.paired import run_statistics
from flexmoe.files import load_checked, one_line, save_checked, write_text_atomic
from flexmoe.methods import LocalRun, Method, Reply, Tensors
from flexmoe.methods.base import strip_prefix, with_prefix
from flexmoe.train import cosine_lr, local_train
from flexmoe.train.loop import carried_optimizer_state, num_local_steps

log = logging.getLogger("flexmoe.engine")

CONFIG_FILE = "config.toml"
INITIAL_WEIGHTS = "checkpoints/initial.safetensors"  # round-0 shared weights: Local clients start there
BASE_METADATA = "base"  # INITIAL_WEIGHTS metadata: fingerprint of the base model the run trains


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of a round: a seeded draw without replacement, a function of (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def round_lr(config: RunConfig, round_index: int) -> float:
    return cosine_lr(config.train, round_index, config.rounds)


def evaluates(config: RunConfig, round_index: int) -> bool:
    every = config.eval.every
    return round_index == config.rounds or (every > 0 and round_index % every == 0)


@dataclass
class Client:
    client_id: int
    train: list
    test: list
    features: list[dict]


@dataclass(frozen=True)
class ClientInfo:
    """What the server's report shows of a client (no examples: they stay on the client)."""

    client_id: int
    domains: tuple[str, ...]
    num_train: int
    num_test: int


def describe(client: Client) -> ClientInfo:
    domains = tuple(sorted({e.domain for e in client.train if e.domain}))
    return ClientInfo(client.client_id, domains, len(client.train), len(client.test))


# ---- building the model and the clients' data ------------------------------------------------
def load_model(config: RunConfig, method: Method) -> tuple[nn.Module, object]:
    """The base with the method's trainable shared part, seeded so every process builds the same."""
    from flexmoe.models import load_base

    model, tokenizer = load_base(config.model)
    torch.manual_seed(config.seed)  # LoRA initialisation: identical on every client
    model = method.prepare_model(model)
    federate_routers(model, config, method)
    model.eval()
    return model, tokenizer


def federate_routers(model: nn.Module, config: RunConfig, method: Method) -> None:
    """FLEx with `flex.federate_routers`: the routers join the shared part from the start, and again
    after every (re-)graft, which freezes all original parameters."""
    if method.grafts and config.flex.federate_routers:
        from flexmoe.models import set_routers_trainable

        set_routers_trainable(model)


def shared_params(model: nn.Module) -> dict[str, nn.Parameter]:
    from flexmoe.models import split_parameters

    return split_parameters(model).shared


def partition_data(config: RunConfig):
    """The run's data split into `num_clients` parts (every engine and client derives the same)."""
    import flexmoe.data
    import flexmoe.data.persona

    data = config.data
    if data.source == "builtin":
        examples = flexmoe.data.builtin_examples()
    else:
        examples = flexmoe.data.load_examples(data.source, format=None if data.format == "auto" else data.format)
    parts = flexmoe.data.partition(
        examples, config.num_clients, scheme=data.partition, by=data.by, per_client=data.per_client,
        alpha=data.alpha, seed=config.seed, test_fraction=data.test_fraction,
    )
    if data.persona:  # each client's answers in its own convention (data/persona.py)
        parts = flexmoe.data.persona.apply_personas(parts, config.seed)
    for part in parts:
        if not part.train:
            raise FlexmoeError(
                f"client {part.client_id} got no training examples (data.partition = {data.partition!r}, "
                f"num_clients = {config.num_clients}); use fewer clients or another partition"
            )
    return parts


def capped_train(config: RunConfig, part) -> list:
    """The client's training examples under `data.max_train_per_client` (a seeded subset)."""
    from flexmoe.data.sample import capped

    return capped(part.train, config.data.max_train_per_client, derived_seed(config.seed, part.client_id, 0xCA9))


def make_client(config: RunConfig, part, tokenizer) -> Client:
    from flexmoe.data import tokenize_examples

    train = capped_train(config, part)
    features = tokenize_examples(train, tokenizer, max_length=config.train.max_length, template=config.data.template)
    return Client(part.client_id, train, part.test, features)


# ---- the client side -------------------------------------------------------------------------
class ClientRunner:
    """Everything a client does, on a model instance that may serve one client or many in turn.

    Its persistent state lives in `store` (`<root>/<client id>/`): method state and optimiser
    state, the graft and gate, the selection. `initial_shared` gives the seeded round-0 shared
    weights (Local clients start from them).
    """

    def __init__(self, config: RunConfig, method: Method, model: nn.Module, tokenizer, store: ClientStore,
                 initial_shared: Callable[[], Tensors], progress: Progress | None = None,
                 detail_dir: Path | None = None):
        self.config = config
        self.detail_dir = detail_dir  # where per-example scores go (eval/detail.py); None = not kept
        self.method = method
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.initial_shared = initial_shared
        self.progress = progress or Progress()

    def has_personal(self, client_id: int) -> bool:
        return self.store.latest(client_id, "personal.safetensors") is not None

    def graft(self, client: Client) -> None:
        """FLEx step 2, once per client before its first round: select, graft, store."""
        from flexmoe.models import save_personal

        cfg = self.config
        self.progress.message(f"grafting client {client.client_id}")
        sample = client.features[: cfg.flex.calibration_examples]
        calibration = [self.collate(sample[i : i + cfg.train.batch_size])  # padding is masked out
                       for i in range(0, len(sample), cfg.train.batch_size)]
        selection = self.method.personalize(self.model, calibration, seed=derived_seed(cfg.seed, client.client_id))
        self.store.save_selection(client.client_id, selection)
        save_personal(self.model, self.store.dir(client.client_id) / "personal.safetensors")

    def train(self, client: Client, round_index: int, received: Tensors) -> tuple[dict, Tensors]:
        """One round of local training from the downlink `received`; saves the client's new state
        as pending and returns (its train record, without bytes; the uplink tensors). If it fails,
        the round's pending state is dropped: the client keeps its last committed state."""
        try:
            return self._train(client, round_index, received)
        except BaseException:
            self.store.discard(client.client_id)
            raise

    def _train(self, client: Client, round_index: int, received: Tensors) -> tuple[dict, Tensors]:
        cfg, cid = self.config, client.client_id
        lr = round_lr(cfg, round_index)
        stored = self.store.load_state(cid)
        client_state = {k: v for k, v in stored.items() if not k.startswith("optim.")}
        self.load_personal(cid)
        self.set_shared(self.method.start_weights(received, client_state, self.initial_shared()))
        replaced = set(shared_params(self.model)) if self.method.communicates else set()  # Local keeps its own
        optimizer_state = carried_optimizer_state(strip_prefix("optim.", stored), replaced, cfg.train.optimizer_state)
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        steps = num_local_steps(cfg.train, len(client.features))
        self.progress.client_started(cid, steps)
        result = local_train(
            self.model, params, client.features, self.collate, cfg.train, lr,
            seed=derived_seed(cfg.seed, round_index, cid), hooks=self.method.train_hooks(received, client_state),
            optimizer_state=optimizer_state, on_step=self.progress.step,
        )
        trained = cpu_clone(shared_params(self.model))
        run = LocalRun(steps=result.steps, lr=lr, num_examples=len(client.features))
        message, client_state = self.method.uplink(received, trained, client_state, run)
        self._save(cid, round_index, client_state, result.optimizer_state)
        self.progress.client_done(cid, result.loss)
        record = {
            "round": round_index, "kind": "train", "client": cid, "loss": result.loss, "steps": result.steps,
            "tokens": result.tokens, "num_examples": run.num_examples, "lr": lr,
        }
        return record, message if self.method.communicates else {}

    def _save(self, cid: int, round_index: int, client_state: Tensors, optimizer_state: Tensors) -> None:
        pending = self.store.begin(cid)
        save_checked(pending / "state.safetensors", {**client_state, **with_prefix("optim.", optimizer_state)})
        if self.method.grafts:
            from flexmoe.models import save_personal

            save_personal(self.model, pending / "personal.safetensors")
        self.store.finish(cid, round_index)

    def personalise(self, client_id: int, global_weights: Tensors) -> None:
        """Make the model client `client_id`'s personalised model: its graft and gate, and the shared
        weights its method evaluates it with (global shared weights + its own state)."""
        client_state = {k: v for k, v in self.store.load_state(client_id).items() if not k.startswith("optim.")}
        self.load_personal(client_id)
        self.set_shared(self.method.eval_weights(global_weights, client_state))

    def evaluate(self, client: Client, round_index: int, global_weights: Tensors,
                 base_load: dict | None = None) -> dict:
        """The client's personalised model (see `personalise`) on its test split (ROUGE-L, test
        loss) and on the knowledge measures; `base_load`: the base's expert load, for routing drift."""
        cfg, cid = self.config, client.client_id
        self.personalise(cid, global_weights)
        self.progress.message(f"round {round_index}: evaluating client {cid}")
        record = {"round": round_index, "kind": "eval", "client": cid, **self.answers(client, round_index, "personal"),
                  "test_loss": self.test_loss(client)}
        if cfg.eval.knowledge:
            record.update(self.knowledge(round_index, f"personal-client-{cid}", base_load))
        return record

    def evaluate_global(self, clients: list[Client], round_index: int, global_weights: Tensors,
                        base_load: dict | None = None) -> tuple[dict[int, float], dict]:
        """The aggregated global model (global shared weights, no graft) on every client's test split
        and on the knowledge measures -> ({client id: ROUGE-L}, {"global_<measure>": value})."""
        from flexmoe.models import grafts_disabled

        self.progress.message(f"round {round_index}: evaluating the global model")
        self.set_shared(global_weights)
        with grafts_disabled(self.model):
            rouge = {c.client_id: self.answers(c, round_index, "global")["rouge_l"] for c in clients}
            measures = {"rouge_l_avg": mean(list(rouge.values()))}
            if self.config.eval.knowledge:
                measures.update(self.knowledge(round_index, "global", base_load))
        measures.pop("expert_load", None)
        return rouge, {f"global_{k}": v for k, v in measures.items()}

    def evaluate_base(self, client: Client) -> dict:
        """Round 0: the untouched base (no graft yet, LoRA at zero) on the client's test split."""
        from flexmoe.eval.detail import content_free

        record = {"round": 0, "kind": "eval", "client": client.client_id, **self.answers(client, 0, "base"),
                  "test_loss": self.test_loss(client)}
        if self.config.eval.content_free:
            record.update(content_free(self.config, client.client_id, client.train, client.test, self.detail_dir))
        return record

    def test_loss(self, client: Client) -> float:
        """Mean response-token loss on the evaluated part of the client's test split."""
        from flexmoe.data import tokenize_examples
        from flexmoe.train.loop import response_loss

        cfg = self.config
        features = tokenize_examples(client.test[: cfg.eval.max_test_examples], self.tokenizer,
                                     max_length=cfg.train.max_length, template=cfg.data.template)
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(features), cfg.eval.batch_size):
                loss, count = response_loss(self.model, self.collate(features[start : start + cfg.eval.batch_size]))
                total, tokens = total + float(loss), tokens + count
        return total / tokens if tokens else float("nan")

    def answers(self, client: Client, round_index: int, model_kind: str) -> dict:
        """Greedy answers on the client's evaluation sample of this round: mean ROUGE-L, exact
        match and the sample size; the per-example scores go to `detail_dir`."""
        from flexmoe.eval.detail import answer_sample, client_file, eval_sample, means, write_detail

        examples = eval_sample(self.config, client.client_id, client.test, round_index)
        detail = answer_sample(self.model, self.tokenizer, self.config, examples)
        write_detail(self.detail_dir, round_index, client_file(model_kind, client.client_id), detail)
        return means(detail)

    def knowledge(self, round_index: int, name: str, base_load: dict | None = None) -> dict:
        from flexmoe.eval.detail import knowledge_round

        return knowledge_round(self.model, self.tokenizer, self.config, round_index, name, self.detail_dir, base_load)

    def set_shared(self, weights: Tensors) -> None:
        from flexmoe.models import set_shared_state

        set_shared_state(self.model, weights)

    def load_personal(self, cid: int) -> None:
        if not self.method.grafts:
            return
        from flexmoe.models import load_personal

        load_personal(self.model, self.store.latest(cid, "personal.safetensors"), adopt_selection=True)
        federate_routers(self.model, self.config, self.method)

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        from flexmoe.data import collate

        return collate(features, self.tokenizer.pad_token_id)


def base_reference(model: nn.Module, tokenizer, config: RunConfig, base_evals: list[dict],
                   detail_dir: Path | None = None) -> dict:
    """The round-0 server record: the untouched base's mean ROUGE-L and test loss, its knowledge
    measures and its expert load (`expert_load_base`: what routing drift is measured from)."""
    reference = {"rouge_l_avg_base": mean([e["rouge_l"] for e in base_evals])} if base_evals else {}
    if base_evals and "test_loss" in base_evals[0]:
        reference["test_loss_base"] = mean([e["test_loss"] for e in base_evals])
    if base_evals:
        reference.update(pooled_means(base_evals, suffix="_base"))
    if config.eval.knowledge:
        measures = knowledge_round(model, tokenizer, config, 0, "base", detail_dir)
        reference.update({f"{k}_base": v for k, v in measures.items()})
    return {"round": 0, "kind": "server", **reference}


def base_load(records: list[dict]) -> dict | None:
    """The base model's per-layer expert load, from the round-0 server record (None without one)."""
    return next((r.get("expert_load_base") for r in records if r["round"] == 0 and r["kind"] == "server"), None)


# ---- the server side -------------------------------------------------------------------------
class ServerRunner:
    """The server's state (global weights, server-optimiser state) and the run directory."""

    def __init__(self, config: RunConfig, method: Method, run_dir: Path):
        self.config = config
        self.method = method
        self.run_dir = Path(run_dir)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.global_weights: Tensors = {}
        self.server_state: Tensors = {}
        self._initial: Tensors | None = None
        self.completed = 0  # the last committed round; the round in progress is the next one
        self._failures: list[dict] = []  # this round's failed clients, logged with the round

    def start(self, initial_weights: Tensors, base: str | None = None) -> None:
        """A fresh run directory with the resolved config and the round-0 shared weights (tagged
        with the base model's fingerprint `base`, so a changed base is refused when the run is used)."""
        if (self.run_dir / "metrics.jsonl").exists():
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
        return completed

    def initial_weights(self) -> Tensors:
        if self._initial is None:
            self._initial = load_checked(self.run_dir / INITIAL_WEIGHTS)[0]
        return self._initial

    def downlink(self) -> Tensors | None:
        """What every sampled client receives this round (None: the method sends nothing)."""
        return self.method.downlink(self.global_weights, self.server_state) if self.method.communicates else None

    def client_failed(self, round_index: int, client_id: int, error: BaseException) -> None:
        """A sampled client raised (or its engine reports it lost): the round goes on without it.
        Logged now and as a `"kind": "failure"` record of the round."""
        reason = f"{type(error).__name__}: {one_line(error)}"
        log.warning("round %d: client %d failed (%s); the round goes on without it", round_index, client_id, reason)
        self._failures.append({"round": round_index, "kind": "failure", "client": client_id, "error": reason})

    def aggregate(self, replies: list[Reply]) -> dict:
        """Aggregate the round in progress: check every reply (engine/validation.py), then combine
        the valid ones, through the differential-privacy release when `privacy.noise_multiplier`
        > 0 (engine/privacy.py). With no valid reply the global model and server state stay."""
        from flexmoe.engine import privacy
        from flexmoe.engine.validation import split_valid, update_norm

        if not self.method.communicates:
            return {}
        round_index = self.completed + 1
        accepted, rejected = split_valid(self.method, self.config.validation, self.global_weights, replies)
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
            "round": round_index, "kind": "server", "clients": sampled, "lr": round_lr(self.config, round_index),
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

    def write_summary(self, wall_seconds: float | None) -> dict:
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
            **{key: last_eval.get(key) for key in (*MEASURES, *(f"global_{k}" for k in MEASURES if k != "test_loss"))},
            **{f"{key}_base": base.get(f"{key}_base") for key in MEASURES if key != "routing_drift"},
            "bytes_up": sum(r["bytes_up"] for r in servers),
            "bytes_down": sum(r["bytes_down"] for r in servers),
            "train_loss": servers[-1]["train_loss"] if servers else None,
            "per_client": per_client(records),
        }
        summary.update(run_statistics(self.run_dir, self.config.seed))  # paired differences and CIs (eval/paired.py)
        if self.config.privacy.noise_multiplier > 0:
            summary.update(dp_epsilon=servers[-1].get("dp_epsilon") if servers else 0.0,
                           dp_delta=self.config.privacy.delta)
        if wall_seconds is not None:
            summary["wall_seconds"] = round(wall_seconds, 2)
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return summary

    def write_report(self, summary: dict, clients: list[ClientInfo]) -> None:
        from flexmoe.report import write_run_report

        write_run_report(self.run_dir, clients)


def weighted(values: list[float], weights: list[int]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else float("nan")


# the per-evaluation measures a summary reports (`rouge_l_avg`: the mean of the clients' `rouge_l`)
MEASURES = ("rouge_l_avg", "test_loss", "knowledge_loss", "probe_accuracy", "expert_load_std", "routing_entropy",
            "routing_drift")
CLIENT_MEASURES = ("rouge_l_global", *MEASURES[1:])


def eval_means(evals: list[dict]) -> dict:
    out = {"rouge_l_avg": mean([e["rouge_l"] for e in evals]), **pooled_means(evals)}
    for key in CLIENT_MEASURES:
        values = [e[key] for e in evals if key in e]
        if values:
            out[key] = mean(values)
    return out


def mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def per_client(records: list[dict]) -> dict[str, dict]:
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
            for key in CLIENT_MEASURES:
                if key in r:
                    row[key] = r[key]
    return table
