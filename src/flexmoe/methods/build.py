"""A run's method: every method's implementation (`<method>/method.py`, each bound to its
declaration by `@register_method`), and `build_method`, which makes the one a config names."""

from flexmoe.config import RunConfig
from flexmoe.errors import FlexmoeError
from flexmoe.methods.base import Method
from flexmoe.methods.fcmoe import method as _fcmoe  # noqa: F401  (importing an implementation registers it)
from flexmoe.methods.fedavg import method as _fedavg  # noqa: F401
from flexmoe.methods.fedavg_ft import method as _fedavg_ft  # noqa: F401
from flexmoe.methods.fedopt import method as _fedopt  # noqa: F401
from flexmoe.methods.fedper import method as _fedper  # noqa: F401
from flexmoe.methods.fedprox import method as _fedprox  # noqa: F401
from flexmoe.methods.flex import method as _flex  # noqa: F401
from flexmoe.methods.local import method as _local  # noqa: F401
from flexmoe.methods.registry import implementation, implemented, registered
from flexmoe.methods.scaffold import method as _scaffold  # noqa: F401

_unimplemented = [name for name in registered() if name not in implemented()]
if _unimplemented:  # a config.py declares a method that no method.py registers
    raise ImportError(f"declared methods without an implementation: {', '.join(_unimplemented)}")


def method_class(name: str) -> type[Method]:
    """The `Method` subclass that implements the declared method `name`."""
    return implementation(name)


def build_method(config: RunConfig) -> Method:
    method = method_class(config.method)(config)
    if config.train.personal_lr and not (method.roles.personal or method.fine_tunes):
        raise FlexmoeError(f"config key train.personal_lr = {config.train.personal_lr}: method {config.method!r} "
                           "has no personal part to train at it (flex, flex+fcmoe, fedper and fedavg-ft have)")
    return method


__all__ = ["build_method", "method_class"]
