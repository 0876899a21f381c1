"""FC-MoE ("Conflict-Aware Federated Fine-Tuning of LLMs with Mixture-of-Experts", arXiv
2606.15625) and its composition with FLEx.

The paper is known from summaries only; every choice they leave open is a `fcmoe.*` option
(config.py) and is cited below where it is made. Per client i and aggregation group k:

1. Importance weights (`importance_weights`): c_{i,k} ∝ f_{i,k}^a · ‖Δ_{i,k}‖^b · n_i^g, normalised
   over the round's clients. f is the client's activation frequency of expert k on its own
   data (non-expert groups: f = 1), ‖Δ‖ the norm of its update, n its training examples;
   a = b = g = 1 by default (`fcmoe.frequency_power`, `norm_power`, `size_power`).
2. Gradient consensus projection (`project_conflicts`): d_k = Σ_i c_{i,k} Δ_{i,k}; an update
   with cos(Δ_{i,k}, d_k) < 0 becomes Δ − (Δ·d/‖d‖²) d; the server applies Σ_i c_{i,k} Δ̂_{i,k}.
   The importance weights are those of the unprojected updates, and d includes every client
   of the round (the summaries define d before any projection).
3. Local knowledge retention (`Fcmoe.retained`): the client re-adds λ·(the component the
   projection removed from its update) to the global model it receives (λ = `fcmoe.retention`,
   0.5 by default). The projection happens on the server, so the client recomputes its removed
   component from its own stored update and the consensus d, which the server broadcasts with
   the next global model for the groups where some update conflicted (up to one more copy of
   the shared weights downstream; nothing without conflicts or when λ = 0). The update is exact when the client took part in the aggregation that d comes
   from; a client that missed it (partial participation) re-adds nothing.

Groups (`groups`): one MoE layer's expert-trainable tensors, row k = expert k's piece Δ_{i,k};
every other trainable tensor forms a one-row group per module or per tensor (`fcmoe.groups`).
Updates are compared in the space of the trainable parameters themselves (LoRA factors, as
FedAvg on LoRA averages them). The pure rule is `conflict`.

Activation frequencies are counted on the client by local training itself (`counts_experts`:
the training loop returns them in `LocalRun.expert_counts`; padding excluded): the tokens each
expert processed, i.e. those whose gradients form its update. They travel with the update as
`activation.<layer>` (one float32 per expert and MoE layer, counted in bytes_up).

The conflict-aware pieces (server rule, consensus downlink, client retention, activation
upload) are one mixin, `ConflictAware`, that both FC-MoE and FLEx + FC-MoE compose.
"""

from __future__ import annotations

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.methods.base import LocalRun, Method, Tensors, TensorSpec
from flexmoe.methods.conflict import (
    client_cosines, conflict_aware_step, consensus_cosines, importance_weights, project_conflicts,
)
from flexmoe.methods.flex.method import Flex
from flexmoe.methods.groups import Group, build_groups, expert_layer, group_matrix, num_experts, split_matrix
from flexmoe.methods.registry import register_method
from flexmoe.methods.rules import Reply, ServerRule
from flexmoe.tensors import strip_prefix, with_prefix

ACTIVATION = "activation."  # uplink: per-expert selection counts of one MoE layer
CONSENSUS = "consensus."  # downlink: the consensus direction d of the last aggregation
ROUND = "round"  # server state and downlink: aggregations done so far
UPDATE = "update."  # client state: its last update (trained - received)
UPDATE_ROUND = "update_round"  # client state: the aggregation that update entered


def groups_of(config, tensors: Tensors) -> list[Group]:
    return build_groups({n: tuple(t.shape) for n, t in tensors.items()}, config.lora.r, config.fcmoe.groups)


class ConflictAwareRule(ServerRule):
    """The server side: importance weights, consensus projection, the consensus kept for retention."""

    def init_state(self, global_weights: Tensors) -> Tensors:
        return {ROUND: torch.zeros(1, dtype=torch.int64)}

    def aggregate(self, global_weights: Tensors, state: Tensors, replies: list[Reply]) -> tuple[Tensors, Tensors, dict]:
        fc = self.config.fcmoe
        sizes = torch.tensor([float(r.num_examples) for r in replies])
        new_global, direction = {}, {}
        conflicts, pairs = 0, 0
        with_consensus, between_clients = [], []  # cosines: why updates do (not) conflict
        for group in groups_of(self.config, global_weights):
            start = group_matrix(global_weights, group)
            updates = torch.stack([group_matrix(r.tensors, group) - start for r in replies])
            frequency = _frequencies(replies, group)
            weights = importance_weights(frequency, updates.norm(dim=-1), sizes,
                                         fc.frequency_power, fc.norm_power, fc.size_power)
            step, d, conflicting = conflict_aware_step(updates, weights, fc.project)
            new_global.update(split_matrix(start + step, group, global_weights))
            if fc.project and conflicting.any():  # elsewhere nothing was removed, so no client needs d
                direction.update(split_matrix(d, group, {n: global_weights[n].float() for n in group.names}))
            conflicts += int(conflicting.sum())
            pairs += conflicting.numel()
            with_consensus.append(consensus_cosines(updates, d))
            between_clients.append(client_cosines(updates))
        new_state = {ROUND: state[ROUND] + 1}
        if fc.retention > 0:
            new_state.update(with_prefix(CONSENSUS, direction))
        return new_global, new_state, {"fcmoe_conflict_fraction": conflicts / max(pairs, 1),
                                       **cosine_metrics(torch.cat(with_consensus), torch.cat(between_clients))}


def cosine_metrics(with_consensus: torch.Tensor, between_clients: torch.Tensor) -> dict:
    """The round's smallest and mean cosine of an update with its consensus (a conflict is one
    below 0) and the mean cosine between two clients' updates of the same row."""
    out = {}
    if with_consensus.numel():
        out.update(fcmoe_min_consensus_cosine=float(with_consensus.min()),
                   fcmoe_mean_consensus_cosine=float(with_consensus.mean()))
    if between_clients.numel():
        out["fcmoe_mean_client_cosine"] = float(between_clients.mean())
    return out


def _frequencies(replies: list[Reply], group: Group) -> torch.Tensor:
    """(N, rows): each client's share of the layer's expert selections; ones off the experts."""
    if not group.experts:
        return torch.ones(len(replies), group.rows)
    key = ACTIVATION + group.key
    rows = []
    for reply in replies:
        if key not in reply.tensors or reply.tensors[key].numel() != group.rows:
            raise FlexmoeError(f"an fcmoe reply lacks activation counts for {group.key} ({group.rows} experts)")
        counts = reply.tensors[key].double()
        rows.append(counts / counts.sum() if counts.sum() > 0 else counts)
    return torch.stack(rows).float()


class ConflictAware:
    """FC-MoE on both sides, for a `Method`: the conflict-aware server rule, the consensus in the
    downlink, activation counts in the uplink, and λ · the removed component re-added on the client."""

    counts_experts = True
    rule_class = ConflictAwareRule

    @property
    def retention(self) -> float:
        """λ in effect: without the projection nothing is removed, so there is nothing to retain."""
        return self.config.fcmoe.retention if self.config.fcmoe.project else 0.0

    def groups(self, tensors: Tensors) -> list[Group]:
        return groups_of(self.config, tensors)

    # ---- server side -----------------------------------------------------------------------
    def downlink(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return {**global_weights, **server_state} if self.retention > 0 else global_weights

    def busiest_downlink(self, global_weights: Tensors) -> Tensors:
        """After a round in which every group had a conflicting update: the consensus of every
        group travels with the global weights."""
        state = self.init_server_state(global_weights)
        state.update(with_prefix(CONSENSUS, {name: torch.zeros_like(t, dtype=torch.float32)
                                             for name, t in global_weights.items()}))
        return self.downlink(global_weights, state)

    def reply_spec(self, global_weights: Tensors) -> dict[str, TensorSpec]:
        """The shared weights, plus (when the client counted them) its per-expert activation counts."""
        spec = Method.reply_spec(self, global_weights)
        rank = self.config.lora.r
        for name, tensor in global_weights.items():
            layer = expert_layer(name)
            if layer is not None:
                rows = num_experts(name, tuple(tensor.shape), rank)
                spec[ACTIVATION + layer] = TensorSpec((rows,), torch.float32, required=False)
        return spec

    # ---- client side -----------------------------------------------------------------------
    def start_weights(self, received: Tensors, client_state: Tensors, initial: Tensors) -> Tensors:
        return self._personalised(received, client_state, list(initial))

    def uplink(
        self, received: Tensors, trained: Tensors, client_state: Tensors, run: LocalRun
    ) -> tuple[Tensors, Tensors]:
        message = {**trained, **with_prefix(ACTIVATION, run.expert_counts)}
        if self.retention == 0:
            return message, {}
        update = {n: t.float() - received[n].float() for n, t in trained.items()}
        return message, {**with_prefix(UPDATE, update), UPDATE_ROUND: received[ROUND] + 1}

    def eval_received(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return self.downlink(global_weights, server_state)

    def eval_weights(self, global_weights: Tensors, client_state: Tensors) -> Tensors:
        names = [n for n in global_weights if n != ROUND and not n.startswith(CONSENSUS)]
        return self._personalised(global_weights, client_state, names)

    def retained(self, received: Tensors, client_state: Tensors) -> Tensors:
        """The component the projection removed from this client's last update (empty when
        there is none to re-add: λ = 0, no update yet, or the client missed that aggregation)."""
        if self.retention == 0 or UPDATE_ROUND not in client_state or ROUND not in received:
            return {}
        if int(client_state[UPDATE_ROUND]) != int(received[ROUND]):
            return {}
        update, direction = strip_prefix(UPDATE, client_state), strip_prefix(CONSENSUS, received)
        removed = {}
        for group in self.groups(update):
            if not all(name in direction for name in group.names):  # no conflict there this round
                continue
            _, gone, _ = project_conflicts(group_matrix(update, group)[None], group_matrix(direction, group))
            removed.update(split_matrix(gone[0], group, update))
        return removed

    def _personalised(self, received: Tensors, client_state: Tensors, names: list[str]) -> Tensors:
        """The received global weights plus λ · the retained component."""
        weights = {n: received[n] for n in names}
        for name, removed in self.retained(received, client_state).items():
            weights[name] = (received[name].float() + self.retention * removed).to(received[name].dtype)
        return weights


@register_method("fcmoe")
class Fcmoe(ConflictAware, Method):
    """FC-MoE: experts trainable (LoRA on the fused experts), conflict-aware aggregation."""

    @property
    def scope(self) -> str:
        return self.config.fcmoe.scope


@register_method("flex+fcmoe")
class FlexFcmoe(ConflictAware, Flex):
    """FLEx whose shared part (attention LoRA, plus the routers with `flex.federate_routers`)
    is aggregated by FC-MoE's conflict-aware rule: FLEx's grafting, gate and roles, FC-MoE's
    pieces on both sides (server rule, consensus downlink, client retention). Grafts stay
    personal: the uplink is the shared weights (and activation counts of no expert: FLEx's
    experts are frozen)."""

    def __init__(self, config):
        if config.flex.aggregator != "fedavg":
            raise FlexmoeError(f"flex.aggregator = {config.flex.aggregator!r} does not apply to method "
                               f"'flex+fcmoe', whose aggregator is FC-MoE's rule (set the fcmoe.* keys)")
        super().__init__(config)

    def make_rule(self) -> ServerRule:
        return ConflictAwareRule(self.config)
