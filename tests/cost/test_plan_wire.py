"""`flexmoe plan` and the communication accounting count messages in the form they travel
(`[wire]`): the meta-tensor layout of a compressed message has exactly the bytes of the real
encoded message, the plan of the tiny base equals the bytes the engine's own encoder produces on
the real model, and the payload shrinks by the element sizes (fp32 4 bytes, bf16/fp16 2, int8 1 plus
one float32 scale per row)."""

from __future__ import annotations

import pytest
import torch

from flexmoe.config import load_config
from flexmoe.cost.comm import meta_model, method_message_sizes, serialized_size
from flexmoe.wire import encode, serialize, wire_layout

WIRES = (["wire.dtype=bf16"], ["wire.dtype=fp16"], ["wire.quantize=int8"],
         ["wire.quantize=int8", "wire.error_feedback=true"])


def _real_bytes(tensors, metadata=None) -> int:
    return len(serialize(tensors, metadata))


@pytest.mark.parametrize("wire", WIRES)
def test_the_layout_of_a_message_has_the_bytes_of_the_encoded_message(wire):
    config = load_config(None, wire).wire
    generator = torch.Generator().manual_seed(0)
    tensors = {"a.lora_A.weight": torch.randn(6, 4, generator=generator), "b.bias": torch.randn(5, generator=generator),
               "c.weight": torch.randn(3, 2, 2, generator=generator), "steps": torch.tensor([3])}
    meta = {n: t.to("meta") for n, t in tensors.items()}
    assert serialized_size(wire_layout(meta, config), {"k": "v"}) == len(serialize(encode(tensors, config)[0], {"k": "v"}))


@pytest.mark.parametrize("wire", WIRES)
def test_planned_bytes_equal_the_real_encoded_messages_of_the_tiny_base(wire):
    from helpers.tiny import tiny_config, tiny_model

    config = load_config(None, ["method=flex", "lora.r=2", *wire])
    real = method_message_sizes(config, tiny_model("qwen2_moe"), num_examples=37, measure=_real_bytes)
    fields = tiny_config("qwen2_moe").to_dict()
    fields.pop("model_type")
    assert method_message_sizes(config, meta_model("qwen2_moe", **fields), num_examples=37) == real


def test_plan_prints_the_bytes_of_the_wire_form(capsys):
    from flexmoe.cli import main
    from flexmoe.cost.plan import plan

    plans = {name: plan(load_config(None, overrides), "tiny") for name, overrides in
             (("fp32", []), ("bf16", ["wire.dtype=bf16"]), ("int8", ["wire.quantize=int8"]))}
    from flexmoe.cost.comm import prepare_like_a_client
    from flexmoe.cost.plan import hf_config, meta_base

    shared = prepare_like_a_client(load_config(None, []), meta_base(hf_config("tiny"), torch.float32))[2].shared
    n = plans["fp32"].shared_params
    rows = sum(t.shape[0] if t.dim() >= 2 else 1 for t in shared.values())
    assert n == sum(t.numel() for t in shared.values())
    # 4 bytes per value in fp32, 2 in bf16, 1 in int8 plus a float32 scale per row
    header_slack = 256 * len(shared)  # the JSON headers differ by at most one entry (~140 bytes: the scales') per tensor
    for direction in ("bytes_up", "bytes_down"):
        fp32, bf16, int8 = (getattr(plans[k], direction) for k in ("fp32", "bf16", "int8"))
        assert abs((fp32 - bf16) - 2 * n) < header_slack
        assert abs((fp32 - int8) - (3 * n - 4 * rows)) < header_slack
    assert plans["int8"].wire == "int8" and plans["fp32"].wire == "fp32"
    assert main(["plan", "tiny", "--set", "wire.quantize=int8"]) == 0
    out = capsys.readouterr().out
    from flexmoe.commands.plan import _size

    assert "travel as int8" in out and f"up (client -> server)       {_size(plans['int8'].bytes_up)}" in out
