"""Communication accounting from shapes alone: `serialized_size` equals the real safetensors
message size, and a method's message sizes on a meta-device model equal the bytes the same
method produces on a real model of the same config."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flexmoe.config import load_config
from flexmoe.cost.comm import REAL_SHAPES, meta_model, method_message_sizes, real_shape_model, serialized_size
from flexmoe.methods import registered
from flexmoe.methods.build import method_class
from flexmoe.wire import serialize

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.int16]
names = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=24).filter(lambda s: s != "__metadata__")
tensor_specs = st.dictionaries(
    names, st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3)), max_size=8)

@settings(max_examples=150, deadline=None)
@given(specs=tensor_specs, metadata=st.one_of(st.none(), st.dictionaries(names, names, max_size=3)))
def test_serialized_size_equals_the_real_message(specs, metadata):
    # safetensors 0.8 writes a malformed header for no tensors with empty metadata; never a message
    assume(specs or metadata != {})
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in specs.items()}
    meta = {name: t.to("meta") for name, t in tensors.items()}
    assert serialized_size(meta, metadata) == len(serialize(tensors, metadata))

def _real_bytes(tensors, metadata=None) -> int:
    return len(serialize(tensors, metadata))

@pytest.mark.parametrize("method", sorted(registered()))
def test_meta_model_sizes_equal_real_bytes_on_a_tiny_model(method):
    from helpers.tiny import tiny_config, tiny_model

    config = load_config(None, [f"method={method}", "lora.r=2"])
    real = method_message_sizes(config, tiny_model("qwen2_moe"), num_examples=37, measure=_real_bytes)
    fields = tiny_config("qwen2_moe").to_dict()
    fields.pop("model_type")
    meta = method_message_sizes(config, meta_model("qwen2_moe", **fields), num_examples=37)
    assert meta == real
    if method_class(method).communicates:
        assert real["up"] > 4 * real["shared_params"]  # at least the fp32 payload
    else:
        assert real["up"] == real["down"] == 0

def test_real_shapes_match_their_published_sizes():
    # total parameters of the published checkpoints: 14.3B, 6.9B, 46.7B
    totals = {name: sum(p.numel() for p in real_shape_model(name).parameters()) for name in REAL_SHAPES}
    assert round(totals["Qwen1.5-MoE-A2.7B"] / 1e9, 1) == 14.3
    assert round(totals["OLMoE-1B-7B"] / 1e9, 1) == 6.9
    assert round(totals["Mixtral-8x7B"] / 1e9, 1) == 46.7
    # FLEx on Qwen1.5-MoE: LoRA r=8 on q/k/v/o of 24 layers, hidden 2048 -> 24*4*8*(2048+2048) values
    sizes = method_message_sizes(load_config(None, ["method=flex"]), real_shape_model("Qwen1.5-MoE-A2.7B"))
    assert sizes["shared_params"] == 24 * 4 * 8 * 4096
    assert 4 * sizes["shared_params"] < sizes["up"] < 4 * sizes["shared_params"] * 1.01

@pytest.mark.parametrize("method", ["fcmoe", "flex+fcmoe"])
def test_busiest_downlink_is_the_downlink_after_a_round_where_every_group_conflicted(method):
    from helpers.tiny import tiny_model

    from flexmoe.methods.build import build_method
    from flexmoe.methods.rules import Reply
    from flexmoe.methods.fcmoe.method import ACTIVATION
    from flexmoe.models import graft, moe_layers, split_parameters

    config = load_config(None, [f"method={method}", "lora.r=2"])
    fc = build_method(config)
    model = fc.prepare_model(tiny_model("qwen2_moe"))
    if fc.grafts:
        graft(model, {layer.name: [0] for layer in moe_layers(model)})
    shared = {name: p.detach().clone() for name, p in split_parameters(model, fc.roles).shared.items()}
    torch.manual_seed(0)
    step = {name: torch.randn_like(t) for name, t in shared.items()}
    counts = {name: torch.ones(spec.shape) for name, spec in fc.reply_spec(shared).items() if name.startswith(ACTIVATION)}
    # updates u and -2u: importance 1/3 and 2/3 (norms), consensus -u, so the first conflicts in every group
    replies = [Reply({**{n: shared[n] + scale * step[n] for n in shared}, **counts}, num_examples=10)
               for scale in (1.0, -2.0)]
    new_global, state, metrics = fc.aggregate(shared, fc.init_server_state(shared), replies)
    assert metrics["fcmoe_conflict_fraction"] == 0.5
    after = len(serialize(fc.downlink(new_global, state)))
    sizes = method_message_sizes(config, tiny_model("qwen2_moe"), measure=_real_bytes)
    assert sizes["down_max"] == after > 2 * sizes["down"]  # the consensus doubles the downlink, about
