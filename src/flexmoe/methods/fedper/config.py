"""FedPer's settings, torch-free: the `[fedper]` section and the method's declaration."""

from __future__ import annotations

from pydantic import Field

from flexmoe.methods.registry import declare_method
from flexmoe.settings import Section


class FedPerConfig(Section):
    """FedPer (methods/fedper/): FLEx's shared attention LoRA, plus a personal LoRA on the routed
    experts that never leaves the client; a personal-capacity control for FLEx's grafting."""

    rank: int = Field(0, ge=0)  # personal expert LoRA rank; 0 = as many trainable parameters as FLEx's graft (flex.k experts + gate, or their LoRA with flex.graft_train = "lora")


declare_method("fedper", section="fedper", private=True)
