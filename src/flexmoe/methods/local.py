"""Local-only training: every client trains its own copy and nothing is exchanged; the
personalised model of a client is simply its own weights."""

from flexmoe.methods.base import LocalRun, Method, Reply, Tensors, strip_prefix, with_prefix


class Local(Method):
    name = "local"
    communicates = False

    def downlink(self, global_weights: Tensors, server_state: Tensors) -> Tensors:
        return {}

    def aggregate(
        self, global_weights: Tensors, server_state: Tensors, replies: list[Reply]
    ) -> tuple[Tensors, Tensors, dict]:
        return global_weights, server_state, {}

    def start_weights(self, received: Tensors, client_state: Tensors, initial: Tensors) -> Tensors:
        return strip_prefix("weights.", client_state) or initial

    def uplink(
        self, received: Tensors, trained: Tensors, client_state: Tensors, run: LocalRun
    ) -> tuple[Tensors, Tensors]:
        return {}, with_prefix("weights.", trained)

    def eval_weights(self, global_weights: Tensors, client_state: Tensors) -> Tensors:
        return strip_prefix("weights.", client_state) or global_weights
