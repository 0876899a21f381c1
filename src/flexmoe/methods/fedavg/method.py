"""FedAvg (McMahan et al. 2017): clients send their trained weights; the server averages
them, weighted by training examples (or uniformly, `server.weighting`)."""

from flexmoe.methods.base import Method
from flexmoe.methods.registry import register_method


@register_method("fedavg")
class FedAvg(Method):
    pass
