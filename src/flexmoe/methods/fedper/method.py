"""FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"), as a
personal-capacity control for FLEx.

The shared part is exactly FLEx's: LoRA on the attention projections (rank `lora.r`), sent and
averaged (FedAvg). The personal part is LoRA on the routed experts' fused weights: trained
locally, never sent, and kept in the client's state from round to round, as FLEx keeps its
graft. With `fedper.rank = 0` its rank is chosen so that it holds about as many trainable parameters
as FLEx's graft of `flex.k` experts (plus gate) per MoE layer, in the graft's training mode (a full
copy, or LoRA on a frozen copy: `flex.graft_train`): the two then differ in *how* the personal
capacity is built (a low-rank update of every expert vs a copy of the best one), not in how much
of it trains.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from flexmoe.methods.base import Method
from flexmoe.methods.flex.method import graft_training
from flexmoe.methods.registry import register_method
from flexmoe.models.families import moe_layers
from flexmoe.models.graft import FULL, GraftTraining, new_graft, set_trainable
from flexmoe.models.roles import Roles, split_parameters

log = logging.getLogger("flexmoe.methods")


def graft_params(model: nn.Module, k: int, gate: str, training: GraftTraining = FULL) -> int:
    """Trainable parameters of FLEx's graft on `model`: k expert copies, or their LoRA (`training`),
    (+ their router rows when k > 1) and the gate, in every MoE layer; counted on a graft built on
    the meta device (no memory)."""
    total = 0
    for layer in moe_layers(model):
        with torch.device("meta"):
            module = new_graft(layer, k, gate, training)
        set_trainable(module)
        total += sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total


def expert_lora_params_per_rank(model: nn.Module) -> int:
    """Parameters one unit of rank adds to LoRA on the fused experts. PEFT wraps a fused (E, out, in)
    tensor with A (E*r, in) and B (out, E*r): E*(in + out) per rank, for gate_up (E, 2I, H) and down (E, H, I)."""
    return sum(layer.num_experts * ((layer.hidden_size + 2 * layer.intermediate_size)
                                    + (layer.intermediate_size + layer.hidden_size))
               for layer in moe_layers(model))


def matched_rank(model: nn.Module, k: int, gate: str, training: GraftTraining = FULL) -> int:
    """The expert LoRA rank whose parameter count is nearest FLEx's trainable graft (at least 1)."""
    return max(1, round(graft_params(model, k, gate, training) / expert_lora_params_per_rank(model)))


@register_method("fedper")
class FedPer(Method):
    @property
    def scope(self) -> str:
        return "attention"

    @property
    def roles(self) -> Roles:
        return Roles(shared=("attention_lora",), personal=("expert_lora",))

    def expert_rank(self, model: nn.Module) -> int:
        flex = self.config.flex
        return self.config.fedper.rank or matched_rank(model, flex.k, flex.gate, graft_training(self.config))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Attention LoRA (shared) and expert LoRA of `expert_rank` (personal), seeded alike on every client."""
        from flexmoe.models import add_lora

        lora, rank = self.config.lora, self.expert_rank(model)
        model = add_lora(model, scope="attention+experts", r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         seed=self.config.seed, expert_r=rank, attention=tuple(lora.attention))
        personal = split_parameters(model, self.roles).numel("personal")
        log.info("fedper: personal expert LoRA of rank %d, %s parameters per client", rank, f"{personal:,}")
        return model
