"""Federated methods: one module each, a client side and a server side (see `base`); each
declares itself once in the registry (`registry.register_method`)."""

from flexmoe.config import RunConfig
# importing a method module registers it; this order is the order the CLI and the docs list them in
from flexmoe.methods import flex, fedavg, fedprox, scaffold, fedopt, local, fcmoe, fedper, fedavg_ft  # noqa: F401, I001
from flexmoe.methods.base import LocalRun, Method, TensorSpec, TrainHooks
from flexmoe.methods.registry import MethodInfo, register_method, registered
from flexmoe.methods.rules import Reply, ServerRule
from flexmoe.tensors import Tensors


def build_method(config: RunConfig) -> Method:
    return registered()[config.method].cls(config)


__all__ = ["LocalRun", "Method", "MethodInfo", "Reply", "ServerRule", "TensorSpec", "Tensors", "TrainHooks",
           "build_method", "register_method", "registered"]
