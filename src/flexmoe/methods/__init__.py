"""Federated methods: one module each, a client side and a server side (see `base`); each
declares itself once in the registry (`registry.register_method`)."""

from flexmoe.config import RunConfig
from flexmoe.errors import FlexmoeError
# importing a method module registers it; this order is the order the CLI and the docs list them in
from flexmoe.methods import flex, fedavg, fedprox, scaffold, fedopt, local, fcmoe, fedper, fedavg_ft  # noqa: F401, I001
from flexmoe.methods.base import LocalRun, Method, TensorSpec, TrainHooks
from flexmoe.methods.registry import MethodInfo, register_method, registered
from flexmoe.methods.rules import Reply, ServerRule
from flexmoe.tensors import Tensors


def build_method(config: RunConfig) -> Method:
    method = registered()[config.method].cls(config)
    if config.train.personal_lr and not (method.roles.personal or method.fine_tunes):
        raise FlexmoeError(f"config key train.personal_lr = {config.train.personal_lr}: method {config.method!r} "
                           "has no personal part to train at it (flex, flex+fcmoe, fedper and fedavg-ft have)")
    return method


__all__ = ["LocalRun", "Method", "MethodInfo", "Reply", "ServerRule", "TensorSpec", "Tensors", "TrainHooks",
           "build_method", "register_method", "registered"]
