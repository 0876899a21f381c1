"""FLEx's settings, torch-free: the `[flex]` section, the allowed values the graft and the
selection check too (each defined once, here), and the method's declaration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from flexmoe.methods.registry import declare_method
from flexmoe.methods.rules_config import SERVER_RULES
from flexmoe.settings import Section

GATES = ("sigmoid", "none")  # the graft's gate (flexmoe.models.graft)
STRATEGIES = ("reconstruction", "random", "frequency")  # expert selection (flexmoe.models.selection)
GRAFT_INITS = ("copy", "zero")  # "zero": an ablation, the selected expert's shape but not its weights
GRAFT_TRAIN_MODES = ("full", "lora")


class FlexConfig(Section):
    gate: Literal[GATES] = "sigmoid"
    selection: Literal[STRATEGIES] = "reconstruction"
    k: int = Field(1, ge=1)
    gate_init_bias: float = -2.0
    calibration_examples: int = Field(32, ge=1)
    calibration_max_tokens: int = Field(2048, ge=16)
    federate_routers: bool = False
    aggregator: Literal[SERVER_RULES] = "fedavg"
    # ablation: "copy" = the selected expert's weights; "zero" = its shape only, gate/up freshly
    # initialised (seeded) and down zeroed, so the graft starts at output 0 (personal capacity, no grafting)
    graft_init: Literal[GRAFT_INITS] = "copy"
    # how the graft trains: "full" = every weight of the copy; "lora" = the copy frozen with LoRA of rank
    # graft_r on its gate/up/down projections (scale lora.alpha / lora.r, dropout lora.dropout), as the
    # authors' released code most likely does; the gate trains in both. A LoRA-mode client stores only its
    # selection, gate and LoRA: the frozen copy is rebuilt from the base
    graft_train: Literal[GRAFT_TRAIN_MODES] = "lora"
    graft_r: int = Field(32, ge=1)  # rank of the graft's LoRA (graft_train = "lora"; the authors' r = 32)

    @model_validator(mode="after")
    def _lora_copies(self) -> FlexConfig:
        if self.graft_train == "lora" and self.graft_init == "zero":
            raise ValueError("flex.graft_init = 'zero' (no copy) needs flex.graft_train = 'full': "
                             "a LoRA-mode graft trains through a frozen copy of the selected expert")
        return self


# The graft's recipe (graft_train "lora", gate_init_bias -2, personal lr 4e-5, the authors' rate) was chosen
# on development seed 100 by a rule written down before the grid ran: benchmarks/results/recipe-2026-12-02.md
GRAFT_LR = 4e-5
declare_method("flex", section="flex", private=True, personal_lr=GRAFT_LR)
