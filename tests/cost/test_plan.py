"""`flexmoe plan`: the shipped shapes are the public checkpoints' architectures (their published
parameter counts), and the planned memory of a client step is within 20% of the peak measured
on a real step of the tiny base on the CPU (counted by the same TensorMemory, on real tensors)."""

from __future__ import annotations

import json

import pytest
import torch

from flexmoe.config import load_config
from flexmoe.cost.plan import hf_config, meta_base, plan, shape_names

# total parameters as published with each checkpoint (billions)
PUBLISHED = {"qwen1.5-moe-a2.7b": 14.3, "olmoe-1b-7b": 6.9, "qwen3-30b-a3b": 30.5, "deepseek-v2-lite": 15.7,
             "mixtral-8x7b": 46.7}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shapes_have_the_published_parameter_counts(name):
    from flexmoe.models import moe_layers

    model = meta_base(hf_config(name), torch.bfloat16)
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert total == pytest.approx(PUBLISHED[name], rel=0.02)
    assert moe_layers(model)  # a layout flexmoe grafts
    assert set(shape_names()) == set(PUBLISHED)


def test_quantisation_reaches_only_the_non_expert_linear_weights():
    """docs/gpu.md: bitsandbytes quantises 8.6% of Qwen1.5-MoE-A2.7B grafted in full (its fused experts stay
    bf16), 9.9% with the default LoRA graft (the frozen copy's projections are plain linear layers)."""
    from flexmoe.cost.plan import _prepared, quantizable_params

    model, _ = _prepared(load_config(None, ["flex.graft_train=full"]), meta_base(hf_config("qwen1.5-moe-a2.7b"), torch.bfloat16))
    share = quantizable_params(model) / sum(p.numel() for p in model.parameters())
    assert 0.08 < share < 0.09
    model, _ = _prepared(load_config(None, []), meta_base(hf_config("qwen1.5-moe-a2.7b"), torch.bfloat16))
    assert 0.095 < quantizable_params(model) / sum(p.numel() for p in model.parameters()) < 0.103


def test_unknown_model_is_a_one_line_error(capsys):
    from flexmoe.cli import main

    assert main(["plan", "no-such-shape"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "qwen1.5-moe-a2.7b" in err


def _fixed_batch(batch: int, length: int, response: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    labels = torch.full((batch, length - 1), -100)
    labels.view(-1)[torch.randperm(batch * (length - 1), generator=generator)[:response]] = 5
    return {"input_ids": torch.randint(3, 6000, (batch, length), generator=generator),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "labels": torch.cat([torch.full((batch, 1), -100), labels], dim=1)}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["method=flex"], ["method=flex", "flex.graft_train=full"],
                                       ["method=fedavg", "lora.scope=attention+experts"]])
def test_planned_step_memory_is_within_20_percent_of_the_measured_peak(overrides):
    """Measured: the tiny base on the CPU, built like a client's (`load_model`, grafted like FLEx),
    one `local_train` step with a fresh optimiser on a fixed 4 x 96 batch with 150 response
    positions, under TensorMemory; plus the weights alive before it. With and without gradient
    checkpointing."""
    from flexmoe.engine.model import load_model
    from flexmoe.methods.build import build_method
    from flexmoe.methods.flex.method import graft_training
    from flexmoe.models import apply_roles, graft, moe_layers
    from flexmoe.train import local_train
    from flexmoe.cost.memory import TensorMemory, tensor_bytes

    batch, length, response = 4, 96, 150
    config = load_config(None, [*overrides, "train.local_steps=1", f"train.batch_size={batch}"])
    planned = plan(config, batch=batch, length=length, response_tokens=response, device_type="cpu")
    method = build_method(config)
    model, _ = load_model(config, method)
    if method.grafts:  # as a client grafts (which experts changes no size)
        graft(model, {layer.name: list(range(config.flex.k)) for layer in moe_layers(model)},
              training=graft_training(config))
    params = apply_roles(model, method.roles).trainable
    assert sum(p.numel() for p in params.values()) == planned.trainable_params
    weights = tensor_bytes(model.parameters())
    assert weights == planned.memory.weights_frozen + planned.memory.weights_trainable
    fixed = _fixed_batch(batch, length, response)
    for checkpointing, memory in ((False, planned.memory), (True, planned.memory_checkpointed)):
        train = config.train.model_copy(update={"gradient_checkpointing": checkpointing})
        with TensorMemory() as counter:
            local_train(model, params, [{}] * batch, lambda features: fixed, train, 1e-3, seed=1)
        assert memory.peak == pytest.approx(weights + counter.peak, rel=0.2), checkpointing
    assert planned.memory_checkpointed.activations < planned.memory.activations / 2


def test_plan_json_on_the_tiny_base(capsys):
    from flexmoe.cli import main

    assert main(["plan", "tiny", "--batch", "2", "--length", "16", "--json", "--set", "method=fedavg"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "fedavg" and result["bytes_up"] > 0 and result["personal_state_bytes"] == 0
    assert result["memory"]["peak"] > result["memory"]["weights_frozen"] > 0
    assert result["peak_bytes"] == result["runtime_bytes"] + max(result["load_peak"], result["memory"]["peak"])


def test_personal_bytes_of_every_method_with_a_personal_part(tmp_path):
    """FedPer's personal expert LoRA and FLEx's graft, as the engine stores them (the bytes of the
    real files a client writes), against the plan's count on the meta device."""
    from flexmoe.engine.model import load_model
    from flexmoe.models.roles import personal_outside_graft
    from flexmoe.cost.comm import serialized_size
    from flexmoe.methods.build import build_method
    from flexmoe.models import graft, moe_layers, save_graft
    from flexmoe.tensors import with_prefix

    for method_name in ("fedper", "flex", "fedavg"):  # (a full graft: its file holds the copy)
        config = load_config(None, [f"method={method_name}", "runtime.device=cpu", "flex.graft_train=full"])
        method = build_method(config)
        model, _ = load_model(config, method)
        # personal tensors in the state file count raw (numel x element size), as the engine counts them
        real = sum(p.numel() * p.element_size() for p in personal_outside_graft(model, method.roles).values())
        if method.grafts:
            graft(model, {layer.name: list(range(config.flex.k)) for layer in moe_layers(model)})
            real += save_graft(model, tmp_path / f"{method_name}.safetensors").stat().st_size
        planned = plan(config, "tiny", batch=2, length=16).personal_state_bytes
        assert (planned > 0) == (method_name != "fedavg"), method_name
        # the graft file's metadata (fingerprint, selection) is not in the plan's count: a few hundred bytes
        assert planned == pytest.approx(real, abs=2048), method_name
