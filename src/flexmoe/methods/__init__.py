"""Federated methods: one package each (`flexmoe/methods/<method>/`), with its settings and
declaration in a torch-free `config.py` and its client and server sides in `method.py` (see
`base`, `registry`). Importing this package declares every method, torch-free, so the run config
checks method names and capabilities without loading model code; `flexmoe.methods.build` loads
the implementations and builds a run's method."""

# importing a method's config declares it; this order is the order the CLI and the docs list them in
from flexmoe.methods.flex import config as _flex  # noqa: F401, I001
from flexmoe.methods.fedavg import config as _fedavg  # noqa: F401
from flexmoe.methods.fedprox import config as _fedprox  # noqa: F401
from flexmoe.methods.scaffold import config as _scaffold  # noqa: F401
from flexmoe.methods.fedopt import config as _fedopt  # noqa: F401
from flexmoe.methods.local import config as _local  # noqa: F401
from flexmoe.methods.fcmoe import config as _fcmoe  # noqa: F401
from flexmoe.methods.fedper import config as _fedper  # noqa: F401
from flexmoe.methods.fedavg_ft import config as _fedavg_ft  # noqa: F401
from flexmoe.methods.registry import MethodInfo, declare_method, register_method, registered

__all__ = ["MethodInfo", "declare_method", "register_method", "registered"]
