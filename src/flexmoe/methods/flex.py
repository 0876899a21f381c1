"""FLEx (Liu et al., arXiv 2506.00965): personalised federated learning for MoE LLMs by
expert grafting.

Every pretrained expert, router and shared expert stays frozen. The shared part is LoRA on
the attention projections (plus the routers with `flex.federate_routers`); only it travels
and is aggregated (FedAvg by default, any server optimiser with `flex.aggregator`). Before
its first round each client grafts a trainable copy of the expert(s) that best reconstruct
each MoE layer's routed output on its own data, behind an adaptive gate that starts nearly
closed; graft and gate never leave the client.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flexmoe.config import RunConfig
from flexmoe.methods.base import Method, Reply, Tensors


class Flex(Method):
    name = "flex"
    grafts = True

    def __init__(self, config: RunConfig):
        super().__init__(config)
        from flexmoe.methods import build_method  # the registry imports this module

        self.aggregator = build_method(config.model_copy(update={"method": config.flex.aggregator}))

    @property
    def scope(self) -> str:
        return "attention"

    def init_server_state(self, global_weights: Tensors) -> Tensors:
        return self.aggregator.init_server_state(global_weights)

    def aggregate(
        self, global_weights: Tensors, server_state: Tensors, replies: list[Reply]
    ) -> tuple[Tensors, Tensors, dict]:
        return self.aggregator.aggregate(global_weights, server_state, replies)

    def personalize(self, model: nn.Module, batches: Iterable[torch.Tensor], seed: int) -> dict:
        """One-shot grafting on the client's calibration batches; returns the selection as JSON."""
        from flexmoe.models import graft, moe_layers, select_experts

        flex = self.config.flex
        selection = select_experts(
            model, batches, k=flex.k, strategy=flex.selection, max_tokens=flex.calibration_max_tokens, seed=seed
        )
        graft(model, selection, gate=flex.gate, gate_init_bias=flex.gate_init_bias)
        if flex.federate_routers:  # graft() freezes every original parameter
            for layer in moe_layers(model):
                layer.router.requires_grad_(True)
        return selection.to_json()
