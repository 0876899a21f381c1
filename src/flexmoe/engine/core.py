"""What both engines share about clients and servers: the client's side of a round
(`ClientRunner`: load its personal and persistent state, graft before its first round, train,
build the uplink, evaluate) and the server's (`ServerRunner`: downlink, validated aggregation,
checkpoints, metrics), the seeded schedule, and the model every process builds the same way.

The round loop itself is `flexmoe.engine.driver`'s; engines only move messages.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexmoe.config import RunConfig, save_config
from flexmoe.data import collate, tokenize_examples
from flexmoe.data.clients import Client
from flexmoe.data.sample import derived_seed
from flexmoe.engine import privacy
from flexmoe.engine.faults import attacked_update, attacks, noise_seed
from flexmoe.engine.progress import Progress
from flexmoe.engine.validation import split_valid, update_norm
from flexmoe.errors import FlexmoeError
from flexmoe.eval.comm import serialized_size
from flexmoe.eval.detail import (
    answer_sample, client_file, content_free, eval_sample, knowledge_round, means, pooled_means, write_detail,
)
from flexmoe.files import load_checked, one_line, save_checked
from flexmoe.methods import LocalRun, Method, Reply, Tensors
from flexmoe.methods.groups import expert_layer
from flexmoe.models import grafts_disabled, load_base, load_personal, save_personal
from flexmoe.models.device import device_measures, model_device, placement, reset_peak_memory, timed
from flexmoe.models.graft import GRAFT
from flexmoe.models.roles import Roles, apply_roles, copy_checked, set_shared_state, split_parameters
from flexmoe.report.summary import eval_means, mean, weighted
from flexmoe.rundir import (
    BASE_METADATA, CONFIG_FILE, INITIAL_WEIGHTS, METRICS_FILE, PERSONAL_FILE, STATE_FILE, ClientStore, MetricsLog,
    load_server, save_server,
)
from flexmoe.tensors import cpu_clone, strip_prefix, with_prefix
from flexmoe.train import cosine_lr, local_train
from flexmoe.train.loop import carried_optimizer_state, num_local_steps, personal_lr, response_loss
from flexmoe.wire import WireError, decode, encode

log = logging.getLogger("flexmoe.engine")
HELD = "personal."  # client-state prefix of the personal parameters outside a graft (FedPer's expert LoRA)
RESIDUAL = "wire_residual."  # client-state prefix of the uplink's rounding error (`wire.error_feedback`)
ENGINE_STATE = ("optim.", HELD, RESIDUAL)  # client-state prefixes the engine keeps for itself, not the method's


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


def round_lr(config: RunConfig, round_index: int) -> float:
    return cosine_lr(config.train, round_index, config.rounds)


def round_personal_lr(config: RunConfig, round_index: int) -> float:
    """The personal parameters' learning rate of the round (`train.personal_lr`; the shared one by default)."""
    return personal_lr(config.train, round_index, config.rounds)


def evaluates(config: RunConfig, round_index: int) -> bool:
    every = config.eval.every
    return round_index == config.rounds or (every > 0 and round_index % every == 0)


def use_threads(config: RunConfig) -> int:
    """Set `runtime.threads` torch intra-op threads (0: keep torch's default); returns the previous count."""
    previous = torch.get_num_threads()
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    return previous


@contextlib.contextmanager
def torch_threads(config: RunConfig):
    """`use_threads` for the block, the previous count restored after it."""
    previous = use_threads(config)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---- the model ------------------------------------------------------------------------------
def load_model(config: RunConfig, method: Method) -> tuple[nn.Module, object]:
    """The base with the method's trainable shared part and its roles, seeded so every process
    builds the same."""
    model, tokenizer = load_base(config.model, **placement(config.runtime))  # runtime.device, runtime.base_dtype
    torch.manual_seed(config.seed)  # LoRA initialisation: identical on every client
    if config.runtime.quantize == "nf4":
        _check_frozen_experts(method, config.method)
    model = method.prepare_model(model)
    apply_roles(model, method.roles)
    model.eval()
    return model, tokenizer


def _check_frozen_experts(method: Method, name: str) -> None:
    """A 4-bit expert is dequantised on access and cannot train (PEFT's `target_parameters` would
    silently match nothing): nf4 is for methods that keep the experts frozen."""
    roles = (*method.roles.shared, *method.roles.personal)
    if getattr(method, "scope", "attention") != "attention" or "expert_lora" in roles:
        raise FlexmoeError(f"runtime.quantize = 'nf4' quantises the frozen experts, but method {name!r} trains "
                           "them; use lora.scope=attention, a method that keeps them frozen, or runtime.quantize=none")


def shared_params(model: nn.Module, method: Method) -> dict[str, nn.Parameter]:
    return split_parameters(model, method.roles).shared


def base_knowledge(model: nn.Module, tokenizer, config: RunConfig, detail_dir: Path | None = None) -> dict:
    """The untouched base's knowledge measures and expert load (`expert_load_base`: what routing
    drift is measured from), as the round-0 server record spells them."""
    if not config.eval.knowledge:
        return {}
    log.info("round 0: knowledge measures of the base model")
    return {f"{k}_base": v for k, v in knowledge_round(model, tokenizer, config, 0, "base", detail_dir).items()}


def base_reference(base_evals: list[dict], knowledge: dict) -> dict:
    """The round-0 server record: the untouched base's mean ROUGE-L and test loss over the
    clients' `base_evals` (and their pooled means), with its `knowledge` (`base_knowledge`)."""
    reference = {"rouge_l_avg_base": mean([e["rouge_l"] for e in base_evals])} if base_evals else {}
    if base_evals and "test_loss" in base_evals[0]:
        reference["test_loss_base"] = mean([e["test_loss"] for e in base_evals])
    if base_evals:
        reference.update(pooled_means(base_evals, suffix="_base"))
    return {"round": 0, "kind": "server", **reference, **knowledge}


def base_load(records: list[dict]) -> dict | None:
    """The base model's per-layer expert load, from the round-0 server record (None without one)."""
    return next((r.get("expert_load_base") for r in records if r["round"] == 0 and r["kind"] == "server"), None)


def global_knowledge(model: nn.Module, tokenizer, config: RunConfig, method: Method, global_weights: Tensors,
                     reference: dict | None, round_index: int, detail_dir: Path | None = None) -> dict:
    """The aggregated global model's (global shared weights, no personal part) knowledge measures, as
    `global_<measure>`: computed once per evaluation, by whoever holds a model (the driver)."""
    if not config.eval.knowledge:
        return {}
    set_shared_state(model, method.roles, global_weights)
    with personal_disabled(model, method.roles):
        measures = knowledge_round(model, tokenizer, config, round_index, "global", detail_dir, reference)
    measures.pop("expert_load", None)
    return {f"global_{k}": v for k, v in measures.items()}


def held_personal(model: nn.Module, roles: Roles) -> dict[str, nn.Parameter]:
    """The personal parameters outside a graft (FedPer's expert LoRA): the graft has its own file
    (`PERSONAL_FILE`) and its own switch (`grafts_disabled`); these live in the client's state file."""
    personal = split_parameters(model, roles).personal
    return {name: p for name, p in personal.items() if GRAFT not in name.split(".")}


@contextlib.contextmanager
def personal_disabled(model: nn.Module, roles: Roles):
    """The model without its personal part, for the block (the global model): grafts off, and the
    personal LoRA zeroed (a zero LoRA adds nothing), its values restored after."""
    held = held_personal(model, roles)
    if any(".lora_A." not in name and ".lora_B." not in name for name in held):
        raise ValueError("only LoRA personal parameters can be disabled by zeroing them")
    saved = {name: p.detach().clone() for name, p in held.items()}
    with torch.no_grad():
        for p in held.values():
            p.zero_()
    try:
        with grafts_disabled(model):
            yield
    finally:
        with torch.no_grad():
            for name, p in held.items():
                p.copy_(saved[name])


# ---- the client side -------------------------------------------------------------------------
class ClientRunner:
    """Everything a client does, on a model instance that may serve one client or many in turn.

    Its persistent state lives in `store` (`<root>/<client id>/`): method state and optimiser
    state, the graft and gate, the selection, and any other personal parameters (FedPer's expert
    LoRA, under `HELD`). `initial_shared` gives the seeded round-0 shared weights (Local clients
    start from them); the model's personal parameters as built (seeded) are every client's start.
    `personal_only`: local training updates the personal part alone, the shared part staying what
    was received (a client joining a finished federation, `engine/join.py`).
    """

    def __init__(self, config: RunConfig, method: Method, model: nn.Module, tokenizer, store: ClientStore,
                 initial_shared: Callable[[], Tensors], progress: Progress | None = None,
                 detail_dir: Path | None = None, personal_only: bool = False):
        self.config = config
        self.personal_only = personal_only
        self.detail_dir = detail_dir  # where per-example scores go (eval/detail.py); None = not kept
        self.method = method
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.initial_shared = initial_shared
        self.progress = progress or Progress()
        self.initial_held = cpu_clone(self._held())

    def _held(self) -> dict[str, nn.Parameter]:
        return held_personal(self.model, self.method.roles)

    def has_personal(self, client_id: int) -> bool:
        return self.store.latest(client_id, PERSONAL_FILE) is not None

    def ensure_grafted(self, client: Client) -> None:
        """Methods that graft: graft a client that has none yet (one not evaluated at round 0 in a
        large population grafts before its first round), on the untouched base as round 0 does:
        the shared part at its initial weights (LoRA at zero), the selection ignoring any graft."""
        if self.method.grafts and not self.has_personal(client.client_id):
            self.set_shared(self.initial_shared())
            self.graft(client)

    def graft(self, client: Client) -> None:
        """FLEx step 2, once per client before its first round: select, graft, store."""
        cfg = self.config
        self.progress.message(f"grafting client {client.client_id}")
        sample = client.features[: cfg.flex.calibration_examples]
        calibration = [self.collate(sample[i : i + cfg.train.batch_size])  # padding is masked out
                       for i in range(0, len(sample), cfg.train.batch_size)]
        selection = self.method.select_and_graft(self.model, calibration,
                                                 seed=derived_seed(cfg.seed, client.client_id))
        apply_roles(self.model, self.method.roles)
        self.store.save_selection(client.client_id, selection)
        save_personal(self.model, self.store.dir(client.client_id) / PERSONAL_FILE)

    def train(self, client: Client, round_index: int, received: Tensors) -> tuple[dict, Tensors]:
        """One round of local training from the downlink `received` (its wire form, `wire.py`);
        saves the client's new state as pending and returns (its train record, without bytes; the
        uplink tensors, in wire form). If it fails, the round's pending state is dropped: the client
        keeps its last committed state."""
        try:
            return self._train(client, round_index, received)
        except BaseException:
            self.store.discard(client.client_id)
            raise

    def _train(self, client: Client, round_index: int, received: Tensors) -> tuple[dict, Tensors]:
        cfg, cid = self.config, client.client_id
        received = decode(received) if cfg.wire.lossy else received
        lr, own_lr = round_lr(cfg, round_index), round_personal_lr(cfg, round_index)
        device, device_record = model_device(self.model), {}
        reset_peak_memory(device)
        with timed(device, device_record, "swap_seconds"):  # the client's state from disk onto the device
            stored = self.store.load_state(cid)
            client_state = method_state(stored)
            self.load_personal(cid, stored)
            start = self.method.start_weights(received, client_state, self.initial_shared())
            self.set_shared(start)
        split = split_parameters(self.model, self.method.roles)
        replaced = set(split.shared) if self.method.communicates else set()  # Local keeps its own
        optimizer_state = carried_optimizer_state(strip_prefix("optim.", stored), replaced, cfg.train.optimizer_state)
        steps = num_local_steps(cfg.train, len(client.features))
        self.progress.client_started(cid, steps)
        trainable, fixed = split.trainable, {}
        if self.personal_only:  # an organisation joining a finished run trains its personal part only
            trainable = {name: p for name, p in trainable.items() if name in split.personal}
            fixed = split.shared
        train = functools.partial(
            local_train, self.model, trainable, client.features, self.collate, cfg.train,
            seed=derived_seed(cfg.seed, round_index, cid), hooks=self.method.train_hooks(received, client_state),
            optimizer_state=optimizer_state,
            count_experts=self._counted_layers(split.shared) if self.method.counts_experts else frozenset(),
        )
        with frozen(fixed.values()):
            result = train(lr, on_step=self.progress.step,
                           other_lr=dict.fromkeys(split.personal, own_lr) if own_lr != lr else None)
        trained = cpu_clone(split.shared)
        fine_tuned = self._fine_tune(train, start, own_lr, trained) if self.method.fine_tunes and own_lr != lr else {}
        run = LocalRun(steps=result.steps, lr=lr, num_examples=len(client.features),
                       expert_counts=result.expert_counts, fine_tuned=fine_tuned)
        message, client_state = self.method.uplink(received, trained, client_state, run)
        attacking = self.method.communicates and attacks(cfg.faults, cid)
        if attacking:
            message = self._attack(message, received, trained, round_index, cid)
        message, residual = self._encode_uplink(message, received, stored)
        stored_personal = self._save(cid, round_index, client_state, result.optimizer_state, residual)
        self.progress.client_done(cid, result.loss)
        record = {
            "round": round_index, "kind": "train", "client": cid, "loss": result.loss, "steps": result.steps,
            "tokens": result.tokens, "num_examples": run.num_examples, "lr": lr,
            **({"personal_lr": own_lr} if cfg.train.personal_lr else {}),
            **({"personal_bytes": stored_personal} if stored_personal else {}),
            **device_measures(device, device_record), **({"attack": cfg.faults.attack} if attacking else {}),
        }
        return record, message if self.method.communicates else {}

    def _attack(self, message: Tensors, received: Tensors, trained: Tensors, round_index: int, cid: int) -> Tensors:
        """The research harness (`[faults]`, engine/faults.py): the message with its update rewritten."""
        shared = {name: received[name] for name in trained}
        update = self.method.reply_update(message, shared)
        hostile = attacked_update(self.config.faults.attack, update, noise_seed(self.config.seed, round_index, cid))
        return self.method.with_update(message, shared, hostile)

    def _encode_uplink(self, message: Tensors, received: Tensors, stored: Tensors) -> tuple[Tensors, Tensors]:
        """(the uplink in wire form, relative to what was received; the new rounding residuals to keep
        with `wire.error_feedback`, else none)."""
        wire = self.config.wire
        residual = strip_prefix(RESIDUAL, stored) if wire.error_feedback else None
        return encode(message, wire, reference=received, residual=residual)

    def _fine_tune(self, train: Callable, start: Tensors, lr: float, trained: Tensors) -> Tensors:
        """A method whose personal model is a local fine-tuning of the shared weights (FedAvg-FT), at a
        personal learning rate of its own: the round's training again, from the same start and seed,
        at `lr`; those weights are kept, the first pass's (`trained`, at the shared rate) are sent. The
        second pass doubles the round's training cost; its optimiser moments are not kept."""
        self.set_shared(start)
        train(lr)
        fine_tuned = cpu_clone(split_parameters(self.model, self.method.roles).shared)
        self.set_shared(trained)
        return fine_tuned

    @staticmethod
    def _counted_layers(shared: dict) -> frozenset[str]:
        """The MoE layers whose experts are shared (trainable): FC-MoE counts their routing."""
        return frozenset(expert_layer(name) for name in shared) - {None}

    def _save(self, cid: int, round_index: int, client_state: Tensors, optimizer_state: Tensors,
              residual: Tensors) -> int:
        """Write the client's new state as pending; returns the bytes its personal part takes on disk:
        its graft file (measured) and the personal tensors of its state file (FedPer's expert LoRA,
        FedAvg-FT's fine-tuned weights: safetensors stores them raw, numel x element size each)."""
        pending = self.store.begin(cid)
        held = with_prefix(HELD, cpu_clone(self._held()))
        save_checked(pending / STATE_FILE, {**client_state, **held, **with_prefix("optim.", optimizer_state),
                                            **with_prefix(RESIDUAL, residual)})
        stored = sum(t.numel() * t.element_size() for t in (*held.values(),
                                                            *self.method.personal_part(client_state).values()))
        if self.method.grafts:
            save_personal(self.model, pending / PERSONAL_FILE)
            stored += (pending / PERSONAL_FILE).stat().st_size
        self.store.finish(cid, round_index)
        return stored

    def load_client_model(self, client_id: int, global_weights: Tensors) -> None:
        """Make the model client `client_id`'s personalised model: its graft and gate, and the shared
        weights its method evaluates it with (global shared weights + its own state; the initial
        weights when nothing was received)."""
        stored = self.store.load_state(client_id)
        self.load_personal(client_id, stored)
        client_state = method_state(stored)
        self.set_shared(self.method.eval_weights(global_weights or self.initial_shared(), client_state))

    def evaluate(self, client: Client, round_index: int, received: Tensors, base_load: dict | None = None,
                 global_weights: Tensors | None = None) -> dict:
        """The client's personalised model (see `load_client_model`) on its test split (ROUGE-L, test
        loss) and on the knowledge measures (`base_load`: the base's expert load, for routing drift);
        with `global_weights`, also the global model (shared weights, no personal part) on its test split
        (`rouge_l_global`)."""
        cfg, cid = self.config, client.client_id
        self.load_client_model(cid, received)
        self.progress.message(f"round {round_index}: evaluating client {cid}")
        record = {"round": round_index, "kind": "eval", "client": cid, **self.answers(client, round_index, "personal"),
                  "test_loss": self.test_loss(client)}
        if cfg.eval.knowledge:
            record.update(self.knowledge(round_index, f"personal-client-{cid}", base_load))
        if global_weights is not None:
            self.set_shared(global_weights)
            with personal_disabled(self.model, self.method.roles):
                record["rouge_l_global"] = self.answers(client, round_index, "global")["rouge_l"]
        return record

    def evaluate_base(self, client: Client) -> dict:
        """Round 0: the untouched base (no graft yet, LoRA at zero) on the client's test split, and
        the content-free answerer (the right template, no facts) as a reference row."""
        self.progress.message(f"round 0: evaluating the base model on client {client.client_id}")
        record = {"round": 0, "kind": "eval", "client": client.client_id, **self.answers(client, 0, "base"),
                  "test_loss": self.test_loss(client)}
        if self.config.eval.content_free:
            record.update(content_free(self.config, client.client_id, client.train, client.test, self.detail_dir))
        return record

    def test_loss(self, client: Client) -> float:
        """Mean response-token loss on the evaluated part of the client's test split."""
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
        examples = eval_sample(self.config, client.client_id, client.test, round_index)
        detail = answer_sample(self.model, self.tokenizer, self.config, examples)
        write_detail(self.detail_dir, round_index, client_file(model_kind, client.client_id), detail)
        return means(detail)

    def knowledge(self, round_index: int, name: str, base_load: dict | None = None) -> dict:
        return knowledge_round(self.model, self.tokenizer, self.config, round_index, name, self.detail_dir, base_load)

    def set_shared(self, weights: Tensors) -> None:
        set_shared_state(self.model, self.method.roles, weights)

    def load_personal(self, cid: int, stored: Tensors) -> None:
        """Client `cid`'s personal parameters into the model: its graft and gate (methods that graft),
        and the others from its state file `stored` (their initial values before its first round)."""
        if self.method.grafts:
            load_personal(self.model, self.store.latest(cid, PERSONAL_FILE), adopt_selection=True)
            apply_roles(self.model, self.method.roles)
        if self.initial_held:
            copy_checked(self._held(), strip_prefix(HELD, stored) or self.initial_held, "personal state",
                         "this model")

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return collate(features, self.tokenizer.pad_token_id)


@contextlib.contextmanager
def frozen(params):
    """`params` take no gradient for the block (no backward through them is wasted), then train again."""
    params = list(params)
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def method_state(stored: Tensors) -> Tensors:
    """The method's part of a client's stored state (without the engine's optimiser and personal tensors)."""
    return {k: v for k, v in stored.items() if not k.startswith(ENGINE_STATE)}


# ---- the server side -------------------------------------------------------------------------
class ServerRunner:
    """The server's state (global weights, server-optimiser state) and the run directory."""

    def __init__(self, config: RunConfig, method: Method, run_dir: Path):
        self.config = config
        self.method = method
        self.run_dir = Path(run_dir)
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE)
        self.global_weights: Tensors = {}
        self.server_state: Tensors = {}
        self._initial: Tensors | None = None
        self.completed = 0  # the last committed round; the round in progress is the next one
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


def failure_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)}"
