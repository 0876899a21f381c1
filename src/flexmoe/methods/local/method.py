"""Local-only training: every client trains its own copy and nothing is exchanged; the
personalised model of a client is simply its own weights."""

from flexmoe.methods.base import LocalRun, Method, Tensors
from flexmoe.methods.registry import register_method
from flexmoe.tensors import strip_prefix, with_prefix


@register_method("local")
class Local(Method):
    communicates = False  # the engines neither send nor aggregate anything

    def downlink(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return {}

    def start_weights(self, received: Tensors, client_state: Tensors, initial: Tensors) -> Tensors:
        return strip_prefix("weights.", client_state) or initial

    def uplink(
        self, received: Tensors, trained: Tensors, client_state: Tensors, run: LocalRun
    ) -> tuple[Tensors, Tensors]:
        return {}, with_prefix("weights.", trained)

    def eval_weights(self, global_weights: Tensors, client_state: Tensors) -> Tensors:
        return strip_prefix("weights.", client_state) or global_weights
