"""The method interface shared by every engine.

A method declares, once, what of the model is shared, personal and frozen (`roles`) and which
server rule combines the replies (`rule`, `flexmoe.methods.rules`); its client side says where
training starts, which terms it adds to local training, what it sends back and what it keeps.
Everything takes and returns flat `{name: tensor}` dicts plus JSON-able metrics, so the
in-process engine and the Flower apps call the very same code.

Weight names are the model's shared parameter names; control variates, deltas and optimiser
moments reuse them behind a prefix ("control.", "delta.", "m.", ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from flexmoe.config import RunConfig
from flexmoe.methods.rules import Reply, ServerRule, WeightedMean, weighted_mean
from flexmoe.models.roles import Roles
from flexmoe.tensors import Tensors, strip_prefix, with_prefix

__all__ = ["LocalRun", "Method", "Reply", "TensorSpec", "Tensors", "TrainHooks", "strip_prefix", "weighted_mean",
           "with_prefix"]

# the model parts each LoRA scope trains and shares (`lora.scope`, `fcmoe.scope`)
SCOPE_PARTS: dict[str, tuple[str, ...]] = {
    "attention": ("attention_lora",),
    "attention+experts": ("attention_lora", "expert_lora"),
    "experts": ("expert_lora",),  # LoRA is added on attention too, but stays at its zero start, frozen and unsent
    "full": ("base",),
}


@dataclass(frozen=True)
class TensorSpec:
    """What the server expects of one tensor of a reply."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    required: bool = True


@dataclass(frozen=True)
class LocalRun:
    """What the client's training loop reports to the method."""

    steps: int  # optimiser steps taken
    lr: float  # local learning rate of this round
    num_examples: int  # size of the client's training set
    expert_counts: Tensors = field(default_factory=dict)  # per MoE layer, tokens routed to each expert (if asked)
    # methods that `fine_tunes`, with train.personal_lr set: the shared weights trained again at that rate
    fine_tuned: Tensors = field(default_factory=dict)


@dataclass(frozen=True)
class TrainHooks:
    """Method-specific terms inside the shared training loop."""

    proximal_mu: float = 0.0  # FedProx: adds mu/2 * ||w - anchor||^2 to the loss
    proximal_anchor: Tensors = field(default_factory=dict)
    grad_correction: Tensors = field(default_factory=dict)  # SCAFFOLD: added to each gradient


class Method:
    """FedAvg-shaped defaults; subclasses override the pieces that differ."""

    name: ClassVar[str]  # set by `register_method`; what the config checks of it (private, averages) is declared in its config.py
    communicates: ClassVar[bool] = True  # False: clients never exchange anything (local)
    grafts: ClassVar[bool] = False  # True: clients hold a personal grafted expert (FLEx)
    counts_experts: ClassVar[bool] = False  # True: local training reports per-expert activation counts
    fine_tunes: ClassVar[bool] = False  # True: the personal model is a local fine-tuning of the shared weights
    rule_class: ClassVar[type[ServerRule]] = WeightedMean

    def __init__(self, config: RunConfig):
        self.config = config
        self.rule = self.make_rule()

    def make_rule(self) -> ServerRule:
        return self.rule_class(self.config)

    @property
    def scope(self) -> str:
        """Which part of the model trains and is shared (a key of `SCOPE_PARTS`)."""
        return self.config.lora.scope

    @property
    def roles(self) -> Roles:
        """What of the model is shared, personal and frozen: the one place a method says it."""
        return Roles(shared=SCOPE_PARTS[self.scope])

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Add the trainable shared part (LoRA for the LoRA scopes); identical on every client."""
        from flexmoe.models import add_lora

        lora = self.config.lora
        lora_scope = "attention+experts" if self.scope == "experts" else self.scope
        return add_lora(model, scope=lora_scope, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                        seed=self.config.seed, attention=tuple(lora.attention))

    # ---- server side -------------------------------------------------------------------
    def init_server_state(self, global_weights: Tensors) -> Tensors:
        return self.rule.init_state(global_weights)

    def downlink(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return global_weights

    def busiest_downlink(self, global_weights: Tensors) -> Tensors:
        """The largest downlink any round can send (communication bounds; round 1's by default)."""
        return self.downlink(global_weights, self.init_server_state(global_weights))

    def aggregate(
        self, global_weights: Tensors, server_state: Tensors, replies: list[Reply]
    ) -> tuple[Tensors, Tensors, dict]:
        return self.rule.aggregate(global_weights, server_state, replies)

    def reply_spec(self, global_weights: Tensors) -> dict[str, TensorSpec]:
        """The tensors a valid reply carries (the server rejects any other reply)."""
        return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in global_weights.items()}

    def reply_update(self, tensors: Tensors, global_weights: Tensors) -> Tensors:
        """The model update a (valid) reply carries: what its norm bound and clipping apply to."""
        return {name: tensors[name].float() - x.float() for name, x in global_weights.items()}

    def with_update(self, tensors: Tensors, global_weights: Tensors, update: Tensors) -> Tensors:
        """`tensors` (a reply) carrying `update` instead of its own: the inverse of `reply_update`."""
        return {**tensors, **{name: (global_weights[name].float() + u).to(tensors[name].dtype)
                              for name, u in update.items()}}

    # ---- client side -------------------------------------------------------------------
    def start_weights(self, received: Tensors, client_state: Tensors, initial: Tensors) -> Tensors:
        """The shared weights the client trains from (`initial`: its freshly initialised ones)."""
        return {name: received[name] for name in initial}

    def train_hooks(self, received: Tensors, client_state: Tensors) -> TrainHooks:
        return TrainHooks()

    def uplink(
        self, received: Tensors, trained: Tensors, client_state: Tensors, run: LocalRun
    ) -> tuple[Tensors, Tensors]:
        """(message to the server, the client's new persistent state)."""
        return trained, client_state

    def personal_part(self, client_state: Tensors) -> Tensors:
        """The tensors of the client's persistent state that make its model personal (its personal
        parameters outside the model's personal roles: FedAvg-FT's fine-tuned weights); counted as
        personal bytes."""
        return {}

    def eval_received(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        """What a client holds after the last aggregation, to build its personalised model from
        (the `global_weights` argument of `eval_weights`): the global weights, or for FC-MoE the
        global weights with the broadcast its retention needs."""
        return global_weights

    def eval_weights(self, global_weights: Tensors, client_state: Tensors) -> Tensors:
        """The shared weights of this client's personalised model."""
        return global_weights
