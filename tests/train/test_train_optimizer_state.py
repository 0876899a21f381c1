"""`train.optimizer_state`: which AdamW moments a client carries into its next round."""

from __future__ import annotations

import torch

from flexmoe.train.loop import carried_optimizer_state

STATE = {f"{name}::{slot}": torch.zeros(1) for name in ("lora_A", "graft.w") for slot in ("exp_avg", "exp_avg_sq")}


def test_keep_reset_and_reset_shared():
    assert carried_optimizer_state(STATE, {"lora_A"}, "keep") == STATE
    assert carried_optimizer_state(STATE, {"lora_A"}, "reset") == {}
    kept = carried_optimizer_state(STATE, {"lora_A"}, "reset-shared")
    assert sorted(kept) == ["graft.w::exp_avg", "graft.w::exp_avg_sq"]  # personal moments survive
    assert carried_optimizer_state(STATE, set(), "reset-shared") == STATE  # nothing replaced (Local)
