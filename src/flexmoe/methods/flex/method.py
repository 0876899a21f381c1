"""FLEx (Liu et al., arXiv 2506.00965): personalised federated learning for MoE LLMs by
expert grafting.

Every pretrained expert, router and shared expert stays frozen. The shared part is LoRA on
the attention projections (plus the routers with `flex.federate_routers`); only it travels
and is aggregated (FedAvg by default, any server optimiser with `flex.aggregator`). Before
its first round each client grafts a trainable copy of the expert(s) that best reconstruct
each MoE layer's routed output on its own data, behind an adaptive gate that starts nearly
closed; graft and gate are personal: they never leave the client. The graft trains in full, or
(`flex.graft_train = "lora"`) as a frozen copy under LoRA of rank `flex.graft_r`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flexmoe.methods.base import Method
from flexmoe.methods.registry import register_method
from flexmoe.config import RunConfig
from flexmoe.methods.rules import RULES, ServerRule
from flexmoe.models.graft import FULL, GraftTraining
from flexmoe.models.roles import Roles


def graft_training(config: RunConfig) -> GraftTraining:
    """How `config`'s graft trains; a LoRA-mode graft's LoRA has the shared LoRA's scale and dropout."""
    flex, lora = config.flex, config.lora
    if flex.graft_train == "full":
        return FULL
    return GraftTraining("lora", flex.graft_r, lora.alpha * flex.graft_r / lora.r, lora.dropout)


@register_method("flex")
class Flex(Method):
    grafts = True

    def make_rule(self) -> ServerRule:
        return RULES[self.config.flex.aggregator](self.config)

    @property
    def scope(self) -> str:
        return "attention"

    @property
    def roles(self) -> Roles:
        routers = ("routers",) if self.config.flex.federate_routers else ()
        return Roles(shared=("attention_lora", *routers), personal=("graft",))

    def select_and_graft(self, model: nn.Module, batches: Iterable[torch.Tensor], seed: int) -> dict:
        """One-shot grafting on the client's calibration batches; returns the selection as JSON.
        (`graft` freezes every original parameter: the engine applies `roles` again after it.)"""
        from flexmoe.models import graft, select_experts

        flex = self.config.flex
        selection = select_experts(
            model, batches, k=flex.k, strategy=flex.selection, max_tokens=flex.calibration_max_tokens, seed=seed
        )
        graft(model, selection, gate=flex.gate, gate_init_bias=flex.gate_init_bias, init=flex.graft_init, seed=seed,
              training=graft_training(self.config))
        return selection.to_json()
