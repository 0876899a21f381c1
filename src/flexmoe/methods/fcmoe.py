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

Groups. An expert group is one MoE layer's expert-trainable tensors; its row k is expert k's
piece Δ_{i,k}. The pieces are laid out as PEFT 0.21's `ParamWrapper` stores LoRA on fused
(E, ·, ·) expert tensors: `lora_A` is (E·r, in) with expert e's rows at e·r … e·r + r − 1;
`lora_B` is (out, r·E) viewed as (out, r, E), so expert e's columns are e, e + E, e + 2E, …;
full fine-tuning slices the fused tensor on dim 0. Every other trainable tensor (attention
LoRA, routers) forms a one-row group per module (its lora_A and lora_B together) or per tensor
(`fcmoe.groups`). Updates are compared in the space of the trainable parameters themselves
(LoRA factors, as FedAvg on LoRA averages them).

Activation frequencies are counted on the client during local training (router hooks between
`train_hooks` and `uplink`; padding excluded): the tokens each expert processed, i.e. those
whose gradients form its update. They travel with the update as `activation.<layer>` (one
float32 per expert and MoE layer, counted in bytes_up).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from flexmoe.config import RunConfig
from flexmoe.errors import FlexmoeError
from flexmoe.methods.base import LocalRun, Method, Reply, Tensors, TensorSpec, TrainHooks, strip_prefix, with_prefix
from flexmoe.methods.flex import Flex

EXPERTS = ".experts."  # fused routed experts; "shared_experts." does not match
ACTIVATION = "activation."  # uplink: per-expert selection counts of one MoE layer
CONSENSUS = "consensus."  # downlink: the consensus direction d of the last aggregation
ROUND = "round"  # server state and downlink: aggregations done so far
UPDATE = "update."  # client state: its last update (trained - received)
UPDATE_ROUND = "update_round"  # client state: the aggregation that update entered

_LORA_A = re.compile(r"\.lora_A\.[^.]+\.weight$")
_LORA_B = re.compile(r"\.lora_B\.[^.]+\.weight$")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")


# ---- the rule: pure functions on (clients, rows, features) tensors ----------------------------
def importance_weights(
    frequency: torch.Tensor, norms: torch.Tensor, sizes: torch.Tensor,
    frequency_power: float = 1.0, norm_power: float = 1.0, size_power: float = 1.0,
) -> torch.Tensor:
    """c (N, K) from activation frequencies (N, K), update norms (N, K) and data sizes (N,):
    the product of their powers, normalised over clients. A row whose raw weights are all zero
    (no client used that expert and none changed it) falls back to data-size weights."""
    raw = frequency.pow(frequency_power) * norms.pow(norm_power) * sizes[:, None].pow(size_power)
    total = raw.sum(dim=0, keepdim=True)
    by_size = (sizes / sizes.sum())[:, None].expand_as(raw)
    return torch.where(total > 0, raw / total.clamp_min(torch.finfo(raw.dtype).tiny), by_size)


def consensus(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d (K, D) = Σ_i c_{i,k} Δ_{i,k} for updates (N, K, D) and weights (N, K)."""
    return torch.einsum("nk,nkd->kd", weights, updates)


def project_conflicts(updates: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(projected, removed, conflicting): every update row with a negative dot product with its
    consensus row (cos < 0) loses its component along it; the others are untouched. A zero
    consensus row conflicts with nothing. projected + removed == updates exactly."""
    dots = torch.einsum("nkd,kd->nk", updates, direction)
    squared = direction.pow(2).sum(dim=-1)
    conflicting = (dots < 0) & (squared > 0)
    coefficient = torch.where(conflicting, dots / squared.clamp_min(torch.finfo(squared.dtype).tiny), 0.0)
    removed = coefficient[..., None] * direction[None]
    return updates - removed, removed, conflicting


def conflict_aware_step(updates: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(server step Σ_i c Δ̂, consensus d, conflicting mask) for updates (N, K, D)."""
    direction = consensus(updates, weights)
    projected, _, conflicting = project_conflicts(updates, direction)
    return consensus(projected, weights), direction, conflicting


# ---- groups: flat tensor dicts <-> (rows, features) matrices ----------------------------------
@dataclass(frozen=True)
class Group:
    key: str  # the MoE layer's name prefix (expert group), or a module / tensor name
    names: tuple[str, ...]
    rows: int  # experts in an expert group, 1 otherwise

    @property
    def experts(self) -> bool:
        return expert_layer(self.names[0]) is not None


def expert_layer(name: str) -> str | None:
    """The MoE layer prefix of an expert-trainable tensor name ("...layers.0.mlp"), else None."""
    head, found, _ = name.partition(EXPERTS)
    return head if found else None


def num_experts(name: str, shape: tuple[int, ...], rank: int) -> int:
    if _LORA_A.search(name):
        return shape[0] // rank
    if _LORA_B.search(name):
        return shape[1] // rank
    return shape[0]


def to_expert_rows(name: str, tensor: torch.Tensor, experts: int) -> torch.Tensor:
    """(E, ·): row e holds expert e's piece of an expert tensor (PEFT ParamWrapper layout)."""
    if _LORA_B.search(name):
        out = tensor.shape[0]
        return tensor.reshape(out, -1, experts).permute(2, 0, 1).reshape(experts, -1)
    return tensor.reshape(experts, -1)


def from_expert_rows(name: str, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_expert_rows`."""
    experts = rows.shape[0]
    if _LORA_B.search(name):
        out = shape[0]
        return rows.reshape(experts, out, -1).permute(1, 2, 0).reshape(shape)
    return rows.reshape(shape)


def build_groups(shapes: dict[str, tuple[int, ...]], rank: int, by: str = "module") -> list[Group]:
    """Aggregation groups of the shared tensors, in a fixed (sorted) order."""
    members: dict[str, list[str]] = {}
    for name in sorted(shapes):
        layer = expert_layer(name)
        if layer is not None:
            key = layer
        elif by == "tensor":
            key = name
        else:  # one module: lora_A with lora_B, or weight with bias
            key = _LORA.sub("", name) if _LORA.search(name) else name.rsplit(".", 1)[0]
        members.setdefault(key, []).append(name)
    groups = []
    for key, names in members.items():
        rows = {num_experts(n, shapes[n], rank) if expert_layer(n) is not None else 1 for n in names}
        if len(rows) != 1:
            raise FlexmoeError(f"expert tensors of {key} disagree on the number of experts (lora.r = {rank}?)")
        groups.append(Group(key, tuple(names), rows.pop()))
    return groups


def group_matrix(tensors: Tensors, group: Group) -> torch.Tensor:
    """The group's tensors as one float32 (rows, features) matrix."""
    parts = [to_expert_rows(n, tensors[n].float(), group.rows) if expert_layer(n) is not None
             else tensors[n].float().reshape(1, -1) for n in group.names]
    return torch.cat(parts, dim=1)


def split_matrix(matrix: torch.Tensor, group: Group, like: Tensors) -> Tensors:
    """Inverse of `group_matrix`, back to each tensor's shape and dtype."""
    out, start = {}, 0
    for name in group.names:
        ref = like[name]
        width = ref.numel() // group.rows
        piece = matrix[:, start : start + width]
        start += width
        shaped = from_expert_rows(name, piece, tuple(ref.shape)) if expert_layer(name) is not None \
            else piece.reshape(ref.shape)
        out[name] = shaped.to(ref.dtype)
    return out


# ---- client metadata: activation counts during local training ---------------------------------
class ActivationCounter:
    """Counts, while open, how many non-padding tokens each MoE layer with trainable experts
    routes to each expert: the tokens whose gradients form that expert's update. Reads the
    routers through `RoutingCounter` and the padding mask from the model call's kwargs."""

    def __init__(self, model: nn.Module, layers: set[str]):
        from flexmoe.eval.routing import RoutingCounter

        self.routing = RoutingCounter(model).__enter__()
        self.keys = {}
        for layer in layers:
            name = next((n for n in self.routing.counts if layer == n or layer.endswith("." + n)), None)
            if name is None:
                self.routing.__exit__()
                raise FlexmoeError(f"no MoE layer of the model matches the expert tensors under {layer!r}")
            self.keys[ACTIVATION + layer] = name
        self.mask_hook = model.register_forward_pre_hook(self._read_mask, with_kwargs=True)

    def _read_mask(self, module, args, kwargs):
        self.routing.attention_mask = kwargs.get("attention_mask")

    def close(self) -> Tensors:
        """Stop counting; the counts as the uplink's `activation.<layer>` tensors."""
        self.mask_hook.remove()
        self.routing.__exit__()
        return {key: self.routing.counts[name].float() for key, name in self.keys.items()}


# ---- the method --------------------------------------------------------------------------------
class Fcmoe(Method):
    """FC-MoE: experts trainable (LoRA on the fused experts), conflict-aware aggregation."""

    name = "fcmoe"

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self._model: nn.Module | None = None  # the client's model, whose routing is counted
        self._counting: ActivationCounter | None = None

    @property
    def scope(self) -> str:
        return self.config.fcmoe.scope

    @property
    def retention(self) -> float:
        return self.config.fcmoe.retention

    def prepare_model(self, model: nn.Module) -> nn.Module:
        from flexmoe.models import add_lora

        lora = self.config.lora
        lora_scope = "attention+experts" if self.scope == "experts" else self.scope
        model = add_lora(model, scope=lora_scope, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         seed=self.config.seed)
        if self.scope == "experts":  # attention LoRA stays at its zero start, frozen and unsent
            for name, param in model.named_parameters():
                if param.requires_grad and expert_layer(name) is None:
                    param.requires_grad_(False)
        self._model = model
        return model

    def groups(self, tensors: Tensors) -> list[Group]:
        return build_groups({n: tuple(t.shape) for n, t in tensors.items()}, self.config.lora.r,
                            self.config.fcmoe.groups)

    # ---- server side -----------------------------------------------------------------------
    def init_server_state(self, global_weights: Tensors) -> Tensors:
        return {ROUND: torch.zeros(1, dtype=torch.int64)}

    def downlink(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return {**global_weights, **server_state} if self.retention > 0 else global_weights

    def busiest_downlink(self, global_weights: Tensors) -> Tensors:
        """After a round in which every group had a conflicting update: the consensus of every
        group travels with the global weights."""
        state = self.init_server_state(global_weights)
        state.update(with_prefix(CONSENSUS, {name: torch.zeros_like(t, dtype=torch.float32)
                                             for name, t in global_weights.items()}))
        return self.downlink(global_weights, state)

    def aggregate(
        self, global_weights: Tensors, server_state: Tensors, replies: list[Reply]
    ) -> tuple[Tensors, Tensors, dict]:
        fc = self.config.fcmoe
        sizes = torch.tensor([float(r.num_examples) for r in replies])
        new_global, direction = {}, {}
        conflicts, pairs = 0, 0
        for group in self.groups(global_weights):
            start = group_matrix(global_weights, group)
            updates = torch.stack([group_matrix(r.tensors, group) - start for r in replies])
            frequency = self._frequencies(replies, group)
            weights = importance_weights(frequency, updates.norm(dim=-1), sizes,
                                         fc.frequency_power, fc.norm_power, fc.size_power)
            step, d, conflicting = conflict_aware_step(updates, weights)
            new_global.update(split_matrix(start + step, group, global_weights))
            if conflicting.any():  # elsewhere nothing was removed, so no client needs d
                direction.update(split_matrix(d, group, {n: global_weights[n].float() for n in group.names}))
            conflicts += int(conflicting.sum())
            pairs += conflicting.numel()
        state = {ROUND: server_state[ROUND] + 1}
        if self.retention > 0:
            state.update(with_prefix(CONSENSUS, direction))
        return new_global, state, {"fcmoe_conflict_fraction": conflicts / max(pairs, 1)}

    def reply_spec(self, global_weights: Tensors) -> dict[str, TensorSpec]:
        """The shared weights, plus (when the client counted them) its per-expert activation counts."""
        spec = super().reply_spec(global_weights)
        rank = self.config.lora.r
        for name, tensor in global_weights.items():
            layer = expert_layer(name)
            if layer is not None:
                rows = num_experts(name, tuple(tensor.shape), rank)
                spec[ACTIVATION + layer] = TensorSpec((rows,), torch.float32, required=False)
        return spec

    def _stop_counting(self) -> Tensors:
        counting, self._counting = self._counting, None
        return counting.close() if counting is not None else {}

    @staticmethod
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

    # ---- client side -----------------------------------------------------------------------
    def train_hooks(self, received: Tensors, client_state: Tensors) -> TrainHooks:
        """Start counting this client's expert selections: local training comes next."""
        self._stop_counting()
        if self._model is not None:
            layers = {expert_layer(n) for n, p in self._model.named_parameters() if p.requires_grad} - {None}
            if layers:
                self._counting = ActivationCounter(self._model, layers)
        return TrainHooks()

    def start_weights(self, received: Tensors, client_state: Tensors, initial: Tensors) -> Tensors:
        return self._personalised(received, client_state, list(initial))

    def uplink(
        self, received: Tensors, trained: Tensors, client_state: Tensors, run: LocalRun
    ) -> tuple[Tensors, Tensors]:
        message = {**trained, **self._stop_counting()}
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


class FlexFcmoe(Flex):
    """FLEx whose shared part (attention LoRA, plus the routers with `flex.federate_routers`)
    is aggregated by FC-MoE's conflict-aware rule: FLEx's grafting and gate, FC-MoE as its
    aggregator on both sides (server rule, consensus downlink, client retention). Grafts stay
    personal: the uplink is the shared weights only."""

    name = "flex+fcmoe"

    def __init__(self, config: RunConfig):
        if config.flex.aggregator != "fedavg":
            raise FlexmoeError(f"flex.aggregator = {config.flex.aggregator!r} does not apply to method "
                               f"'flex+fcmoe', whose aggregator is FC-MoE's rule (set the fcmoe.* keys)")
        super().__init__(config)
        self.aggregator = Fcmoe(config)

    def downlink(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return self.aggregator.downlink(global_weights, server_state)

    def busiest_downlink(self, global_weights: Tensors) -> Tensors:
        return self.aggregator.busiest_downlink(global_weights)

    def start_weights(self, received: Tensors, client_state: Tensors, initial: Tensors) -> Tensors:
        return self.aggregator.start_weights(received, client_state, initial)

    def uplink(
        self, received: Tensors, trained: Tensors, client_state: Tensors, run: LocalRun
    ) -> tuple[Tensors, Tensors]:
        return self.aggregator.uplink(received, trained, client_state, run)

    def eval_received(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return self.aggregator.eval_received(global_weights, server_state)

    def eval_weights(self, global_weights: Tensors, client_state: Tensors) -> Tensors:
        return self.aggregator.eval_weights(global_weights, client_state)
