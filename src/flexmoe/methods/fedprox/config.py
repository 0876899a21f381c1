"""FedProx's settings, torch-free: the `[fedprox]` section and the method's declaration."""

from __future__ import annotations

from pydantic import Field

from flexmoe.methods.registry import declare_method
from flexmoe.settings import Section


class FedProxConfig(Section):
    mu: float = Field(0.01, ge=0)


declare_method("fedprox", section="fedprox", private=True)
