"""SCAFFOLD's settings, torch-free: the `[scaffold]` section and the method's declaration."""

from __future__ import annotations

from pydantic import Field

from flexmoe.methods.registry import declare_method
from flexmoe.settings import Section


class ScaffoldConfig(Section):
    server_lr: float = Field(1.0, gt=0)


declare_method("scaffold", section="scaffold")
