"""The one registry of federated methods: each method module declares its name, the config
section it reads and what it supports, once, with `@register_method` (the config, the CLI, the
compare command and the docs read the names from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type
    section: str | None  # the config section of its own settings ([fedprox], [flex], ...), if any
    private: bool  # its reply is the shared weights: differential privacy (clip + noise the mean) applies


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, section: str | None = None, private: bool = False):
    """Class decorator: make a `Method` subclass available as `method = name`."""

    def register(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = MethodInfo(name, cls, section, private)
        return cls

    return register


def registered() -> dict[str, MethodInfo]:
    """Every method, by name, in registration order."""
    import flexmoe.methods  # noqa: F401  (importing the package registers every method module)

    return dict(_METHODS)
