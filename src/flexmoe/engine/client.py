"""A client's side of a run, the same in both engines: its state on disk (`ClientStore`), round 0
once (the untouched base evaluated, then its graft), each round's local training and uplink, and
loading its personalised model for the evaluator (`engine/evaluator.py`).

The round loop is `flexmoe.engine.driver`'s; the server's side is `flexmoe.engine.server`'s.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flexmoe.config import RunConfig
from flexmoe.data import collate
from flexmoe.clients import Client
from flexmoe.data.sample import derived_seed
from flexmoe.engine.evaluator import Evaluator
from flexmoe.engine.faults import attacked_update, attacks, noise_seed
from flexmoe.engine.progress import Progress
from flexmoe.methods.base import LocalRun, Method
from flexmoe.tensors import Tensors
from flexmoe.methods.groups import expert_layer
from flexmoe.models import load_graft, save_graft
from flexmoe.models.device import device_measures, model_device, reset_peak_memory, timed
from flexmoe.models.roles import apply_roles, copy_checked, personal_outside_graft, set_shared_state, split_parameters
from flexmoe.rundir import GRAFT_FILE, ClientState, ClientStore
from flexmoe.tensors import cpu_clone
from flexmoe.train import cosine_lr, local_train
from flexmoe.train.loop import carried_optimizer_state, num_local_steps, personal_lr
from flexmoe.wire import decode, encode


def calibration_batches(config: RunConfig, client: Client, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """FLEx's calibration sample of a client: its first `flex.calibration_examples` training
    features in `train.batch_size` batches (padding is masked out)."""
    sample, size = client.features[: config.flex.calibration_examples], config.train.batch_size
    return [collate(sample[i : i + size], pad_token_id) for i in range(0, len(sample), size)]


class ClientRunner:
    """Everything a client does, on a model instance that may serve one client or many in turn.

    Its persistent state lives in `store` (`<root>/<client id>/`): method state and optimiser
    state, the graft and gate, the selection, and any other personal parameters (FedPer's expert
    LoRA: `ClientState.personal`). `initial_shared` gives the seeded round-0 shared weights (Local clients
    start from them); the model's personal parameters as built (seeded) are every client's start.
    `personal_only`: local training updates the personal part alone, the shared part staying what
    was received (a client joining a finished federation, `engine/join.py`).
    """

    def __init__(self, config: RunConfig, method: Method, model: nn.Module, tokenizer, store: ClientStore,
                 initial_shared: Callable[[], Tensors], progress: Progress | None = None,
                 detail_dir: Path | None = None, personal_only: bool = False):
        self.config = config
        self.personal_only = personal_only
        self.method = method
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.initial_shared = initial_shared
        self.progress = progress or Progress()
        self.evaluator = Evaluator(config, model, tokenizer, method.roles, detail_dir)
        self.initial_personal = cpu_clone(self._personal_outside_graft())

    def _personal_outside_graft(self) -> dict[str, nn.Parameter]:
        return personal_outside_graft(self.model, self.method.roles)

    def has_graft(self, client_id: int) -> bool:
        return self.store.latest(client_id, GRAFT_FILE) is not None

    def ensure_grafted(self, client: Client) -> None:
        """Methods that graft: graft a client that has none yet (one not evaluated at round 0 in a
        large population grafts before its first round), on the untouched base as round 0 does:
        the shared part at its initial weights (LoRA at zero), the selection ignoring any graft."""
        if self.method.grafts and not self.has_graft(client.client_id):
            self.set_shared(self.initial_shared())
            self.graft(client)

    def graft(self, client: Client) -> None:
        """FLEx step 2, once per client before its first round: select, graft, store."""
        cfg = self.config
        self.progress.message(f"grafting client {client.client_id}")
        calibration = calibration_batches(cfg, client, self.tokenizer.pad_token_id)
        selection = self.method.select_and_graft(self.model, calibration,
                                                 seed=derived_seed(cfg.seed, client.client_id))
        apply_roles(self.model, self.method.roles)
        self.store.save_selection(client.client_id, selection)
        save_graft(self.model, self.store.dir(client.client_id) / GRAFT_FILE)

    def round_zero(self, clients: list[Client], evaluate_base: bool) -> list[dict]:
        """Round 0 of these clients: the untouched base on each one's test split (when
        `evaluate_base`), every one before any graft, then each one's graft (methods that graft)."""
        records = [self.evaluate_base(client) for client in clients] if evaluate_base else []
        for client in clients:
            self.ensure_grafted(client)
        return records

    def train(self, client: Client, round_index: int, received: Tensors) -> tuple[dict, Tensors]:
        """One round of local training from the downlink `received` (its wire form, `wire.py`),
        grafting first a client that has no graft yet; saves the client's new state as pending and
        returns (its train record, without bytes; the uplink tensors, in wire form). If it fails,
        the round's pending state is dropped: the client keeps its last committed state."""
        try:
            self.ensure_grafted(client)
            return self._train(client, round_index, received)
        except BaseException:
            self.store.discard(client.client_id)
            raise

    def _train(self, client: Client, round_index: int, received: Tensors) -> tuple[dict, Tensors]:
        cfg, cid = self.config, client.client_id
        received = decode(received) if cfg.wire.lossy else received
        lr, own_lr = cosine_lr(cfg.train, round_index, cfg.rounds), personal_lr(cfg.train, round_index, cfg.rounds)
        device, device_record = model_device(self.model), {}
        reset_peak_memory(device)
        with timed(device, device_record, "swap_seconds"):  # the client's state from disk onto the device
            stored = self.store.load_state(cid)
            client_state = stored.method
            self.load_personal(cid, stored)
            start = self.method.start_weights(received, client_state, self.initial_shared())
            self.set_shared(start)
        split = split_parameters(self.model, self.method.roles)
        replaced = set(split.shared) if self.method.communicates else set()  # Local keeps its own
        optimizer_state = carried_optimizer_state(stored.optimizer, replaced, cfg.train.optimizer_state)
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

    def _encode_uplink(self, message: Tensors, received: Tensors, stored: ClientState) -> tuple[Tensors, Tensors]:
        """(the uplink in wire form, relative to what was received; the new rounding residuals to keep
        with `wire.error_feedback`, else none)."""
        wire = self.config.wire
        residual = stored.residual if wire.error_feedback else None
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
        state = ClientState(method=client_state, optimizer=optimizer_state, personal=cpu_clone(self._personal_outside_graft()),
                            residual=residual)
        self.store.save_state(cid, state)
        stored = sum(t.numel() * t.element_size() for t in (*state.personal.values(),
                                                            *self.method.personal_part(client_state).values()))
        if self.method.grafts:
            save_graft(self.model, pending / GRAFT_FILE)
            stored += (pending / GRAFT_FILE).stat().st_size
        self.store.finish(cid, round_index)
        return stored

    def load_client_model(self, client_id: int, global_weights: Tensors) -> None:
        """Make the model client `client_id`'s personalised model: its graft and gate, and the shared
        weights its method evaluates it with (global shared weights + its own state; the initial
        weights when nothing was received)."""
        stored = self.store.load_state(client_id)
        self.load_personal(client_id, stored)
        client_state = stored.method
        self.set_shared(self.method.eval_weights(global_weights or self.initial_shared(), client_state))

    def evaluate(self, client: Client, round_index: int, received: Tensors, base_load: dict | None = None,
                 global_weights: Tensors | None = None) -> dict:
        """The client's personalised model (see `load_client_model`; grafted first if it has no graft
        yet) through the evaluator (`Evaluator.personalised`); with `global_weights`, the global model too."""
        self.ensure_grafted(client)
        self.load_client_model(client.client_id, received)
        self.progress.message(f"round {round_index}: evaluating client {client.client_id}")
        return self.evaluator.personalised(client, round_index, base_load, global_weights)

    def evaluate_base(self, client: Client) -> dict:
        """Round 0: the untouched base on the client's test split (`Evaluator.base`)."""
        self.progress.message(f"round 0: evaluating the base model on client {client.client_id}")
        return self.evaluator.base(client)

    def set_shared(self, weights: Tensors) -> None:
        set_shared_state(self.model, self.method.roles, weights)

    def load_personal(self, cid: int, stored: ClientState) -> None:
        """Client `cid`'s personal parameters into the model: its graft and gate (methods that graft),
        and the others from its state file `stored` (their initial values before its first round)."""
        if self.method.grafts:
            load_graft(self.model, self.store.latest(cid, GRAFT_FILE), adopt_selection=True)
            apply_roles(self.model, self.method.roles)
        if self.initial_personal:
            copy_checked(self._personal_outside_graft(), stored.personal or self.initial_personal, "personal state",
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
