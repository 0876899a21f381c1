"""Federated methods: one module each, a client side and a server side (see `base`)."""

from flexmoe.config import RunConfig
from flexmoe.methods.base import LocalRun, Method, Reply, Tensors, TensorSpec, TrainHooks
from flexmoe.methods.fcmoe import Fcmoe, FlexFcmoe
from flexmoe.methods.fedavg import FedAvg
from flexmoe.methods.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flexmoe.methods.fedprox import FedProx
from flexmoe.methods.flex import Flex
from flexmoe.methods.local import Local
from flexmoe.methods.scaffold import Scaffold

METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (
        Flex, FedAvg, FedProx, Scaffold, FedAvgM, FedAdagrad, FedYogi, FedAdam, Local, Fcmoe, FlexFcmoe,
    )
}


def build_method(config: RunConfig) -> Method:
    return METHOD_CLASSES[config.method](config)


__all__ = ["METHOD_CLASSES", "LocalRun", "Method", "Reply", "TensorSpec", "Tensors", "TrainHooks", "build_method"]
