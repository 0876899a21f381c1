"""The one registry of federated methods.

A method lives in its own package, `flexmoe/methods/<method>/`, in two modules:
- `config.py`, torch-free: its config section (if it has one of its own) and its declaration,
  `declare_method(name, section=..., private=..., averages=..., personal_lr=...)`: the name, the capabilities
  the config checks, the CLI, the compare command and the docs read without loading torch;
- `method.py`: the `Method` subclass, bound to its declaration with `@register_method(name)`.

`flexmoe.methods` imports every `config.py` (so `registered()` lists every method, torch-free);
`flexmoe.methods.build` imports every `method.py` and builds a run's method.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    section: str | None  # the config section of its own settings ([fedprox], [flex], ...), if any
    private: bool  # its reply is the shared weights: differential privacy (clip + noise the mean) applies
    averages: bool  # its rule averages the replies, so `server.robust` can replace the mean
    # its personal parameters' learning rate where `train.personal_lr` is not set (0 = train.lr)
    personal_lr: float = 0.0


_METHODS: dict[str, MethodInfo] = {}
_CLASSES: dict[str, type] = {}


def declare_method(name: str, section: str | None = None, private: bool = False, averages: bool = True,
                   personal_lr: float = 0.0) -> MethodInfo:
    """Make `method = name` valid in the config, with the capabilities the config checks and the
    default of `train.personal_lr` for it."""
    if name in _METHODS:
        raise ValueError(f"method {name!r} is declared twice")
    _METHODS[name] = info = MethodInfo(name, section, private, averages, personal_lr)
    return info


def register_method(name: str):
    """Class decorator: the `Method` subclass that implements the declared method `name`."""

    def register(cls: type) -> type:
        if name not in _METHODS:
            raise ValueError(f"method {name!r} is not declared: call declare_method in its config.py")
        if name in _CLASSES:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _CLASSES[name] = cls
        return cls

    return register


def registered() -> dict[str, MethodInfo]:
    """Every declared method, by name, in declaration order (the order the CLI and the docs list them in)."""
    return dict(_METHODS)


def implemented() -> list[str]:
    """The methods whose `method.py` has been imported (all of them after `import flexmoe.methods.build`)."""
    return list(_CLASSES)


def implementation(name: str) -> type:
    """The class registered for `name` (its `method.py` must have been imported: `flexmoe.methods.build`)."""
    if name not in _CLASSES:
        raise KeyError(f"method {name!r} has no registered implementation")
    return _CLASSES[name]
