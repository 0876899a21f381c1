"""The method interface shared by every engine.

A method is two small pieces: the client side (where training starts, which terms it adds
to local training, what it sends back and what it keeps) and the server side (what it sends
down, how it combines replies). Both take and return flat `{name: tensor}` dicts plus
JSON-able metrics, so the in-process engine and the Flower apps call the very same code.

Weight names are the model's trainable shared parameter names; control variates, deltas and
optimiser moments reuse them behind a prefix ("control.", "delta.", "m.", ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from flexmoe.config import RunConfig

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Reply:
    """One client's upload, as the server sees it."""

    tensors: Tensors
    num_examples: int
    client: int = -1  # the sender's client id, for logging a rejected update (-1: unknown)


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


@dataclass(frozen=True)
class TrainHooks:
    """Method-specific terms inside the shared training loop."""

    proximal_mu: float = 0.0  # FedProx: adds mu/2 * ||w - anchor||^2 to the loss
    proximal_anchor: Tensors = field(default_factory=dict)
    grad_correction: Tensors = field(default_factory=dict)  # SCAFFOLD: added to each gradient


def with_prefix(prefix: str, tensors: Tensors) -> Tensors:
    return {prefix + name: t for name, t in tensors.items()}


def strip_prefix(prefix: str, tensors: Tensors) -> Tensors:
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def weighted_mean(dicts: list[Tensors], weights: list[float]) -> Tensors:
    """Per-key weighted mean in float32 (then back to each tensor's dtype)."""
    total = float(sum(weights))
    if not dicts or total <= 0:
        raise ValueError("weighted_mean needs at least one reply with positive weight")
    out = {}
    for name, first in dicts[0].items():
        acc = sum(d[name].float() * (w / total) for d, w in zip(dicts, weights))
        out[name] = acc.to(first.dtype)
    return out


class Method:
    """FedAvg-shaped defaults; subclasses override the pieces that differ."""

    name: ClassVar[str]
    communicates: ClassVar[bool] = True  # False: clients never exchange anything (local)
    grafts: ClassVar[bool] = False  # True: clients hold a personal grafted expert (FLEx)

    def __init__(self, config: RunConfig):
        self.config = config

    @property
    def scope(self) -> str:
        """Which part of the model trains and is shared."""
        return self.config.lora.scope

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Make the shared part trainable (LoRA for the LoRA scopes); identical on every client."""
        from flexmoe.models import add_lora

        lora = self.config.lora
        return add_lora(model, scope=self.scope, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                        seed=self.config.seed)

    # ---- server side -------------------------------------------------------------------
    def init_server_state(self, global_weights: Tensors) -> Tensors:
        return {}

    def downlink(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return global_weights

    def busiest_downlink(self, global_weights: Tensors) -> Tensors:
        """The largest downlink any round can send (communication bounds; round 1's by default)."""
        return self.downlink(global_weights, self.init_server_state(global_weights))

    def aggregate(
        self, global_weights: Tensors, server_state: Tensors, replies: list[Reply]
    ) -> tuple[Tensors, Tensors, dict]:
        return self.average(replies), server_state, {}

    def reply_spec(self, global_weights: Tensors) -> dict[str, TensorSpec]:
        """The tensors a valid reply carries (the server rejects any other reply)."""
        return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in global_weights.items()}

    def reply_update(self, tensors: Tensors, global_weights: Tensors) -> Tensors:
        """The model update a (valid) reply carries: what its norm bound and clipping apply to."""
        return {name: tensors[name].float() - x.float() for name, x in global_weights.items()}

    def average(self, replies: list[Reply]) -> Tensors:
        uniform = self.config.server.weighting == "uniform"
        weights = [1.0 if uniform else float(r.num_examples) for r in replies]
        return weighted_mean([r.tensors for r in replies], weights)

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

    def eval_received(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        """What a client holds after the last aggregation, to build its personalised model from
        (the `global_weights` argument of `eval_weights`): the global weights, or for FC-MoE the
        global weights with the broadcast its retention needs."""
        return global_weights

    def eval_weights(self, global_weights: Tensors, client_state: Tensors) -> Tensors:
        """The shared weights of this client's personalised model."""
        return global_weights
