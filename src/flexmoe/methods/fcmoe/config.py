"""FC-MoE's settings, torch-free: the `[fcmoe]` section and the declarations of FC-MoE and
FLEx + FC-MoE (importance-weighted, projected updates: no mean for a robust rule to replace)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flexmoe.methods.flex.config import GRAFT_LR
from flexmoe.methods.registry import declare_method
from flexmoe.settings import Section


class FcmoeConfig(Section):
    """FC-MoE (arXiv 2606.15625; methods/fcmoe/). Its details are known from summaries only,
    so each choice they leave open is a knob with a stated default.

    c_{i,k} ∝ frequency^frequency_power · ‖update‖^norm_power · examples^size_power, normalised
    over clients (a power of 0 drops that factor); conflicting updates (cos < 0 with the
    consensus) are projected; λ = retention re-adds the removed component on the client.
    """

    # what trains and is shared: expert LoRA with attention LoRA, expert LoRA alone, or everything
    scope: Literal["attention+experts", "experts", "full"] = "attention+experts"
    retention: float = Field(0.5, ge=0)  # λ; 0 = no local knowledge retention (and no consensus downlink)
    # the gradient consensus projection; false (an ablation): conflicting updates are averaged as they are
    # (the conflict fraction is still measured; retention has nothing removed to re-add, so nothing is sent)
    project: bool = True
    frequency_power: float = Field(1.0, ge=0)
    norm_power: float = Field(1.0, ge=0)
    size_power: float = Field(1.0, ge=0)
    groups: Literal["module", "tensor"] = "module"  # projection unit of the non-expert trainables


declare_method("fcmoe", section="fcmoe", averages=False)
declare_method("flex+fcmoe", section="fcmoe", averages=False, personal_lr=GRAFT_LR)  # FLEx's graft, FLEx's rate
