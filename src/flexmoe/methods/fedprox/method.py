"""FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 * ||w - w_global||^2 in each
client's loss, which keeps local models near the global one on non-IID data."""

from flexmoe.methods.base import Method, Tensors, TrainHooks
from flexmoe.methods.registry import register_method


@register_method("fedprox")
class FedProx(Method):
    def train_hooks(self, received: Tensors, client_state: Tensors) -> TrainHooks:
        return TrainHooks(proximal_mu=self.config.fedprox.mu, proximal_anchor=received)
