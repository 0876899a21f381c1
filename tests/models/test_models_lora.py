"""LoRA scopes land exactly where stated; the parameter split into shared / personal / frozen."""

from __future__ import annotations

import re

import pytest
import torch

from flexmoe.errors import FlexmoeError
from flexmoe.models.roles import Roles, apply_roles, set_shared_state, shared_state, split_parameters
from flexmoe.models import (
    FAMILIES,
    add_lora,
    check_lora_placement,
    graft,
    lora_module_names,
    moe_layers,
    select_experts,
)

from helpers.tiny import tiny_model, token_batches


def attention_projections(model, family):
    names = FAMILIES[family].attention
    return {name for name, _ in model.named_modules()
            if ".self_attn." in name and name.rsplit(".", 1)[-1] in names}


def test_attention_scope_puts_lora_on_every_attention_projection_only(family):
    model = tiny_model(family)
    expected = attention_projections(model, family)
    wrapped = add_lora(model, "attention")
    assert set(lora_module_names(wrapped)) == expected
    assert not any(re.search(r"experts|shared_expert|\.gate$|router|mlp", n) for n in lora_module_names(wrapped))
    assert all(not (p.requires_grad and "lora_" not in n) for n, p in wrapped.named_parameters())


def test_attention_and_experts_scope_adds_the_fused_experts(family):
    model = tiny_model(family)
    expected = attention_projections(model, family)
    experts = {f"{layer.name}.experts" for layer in moe_layers(model)}
    wrapped = add_lora(model, "attention+experts")
    placed = {re.sub(r"(\.base_layer)+$", "", n) for n in lora_module_names(wrapped)}
    assert placed == expected | experts
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    # the experts' LoRA is live: a non-zero B changes the block output
    layer = moe_layers(wrapped)[0]
    x = torch.randn(1, 3, layer.hidden_size)
    with torch.no_grad():
        before = layer.block(x)
        for n, p in wrapped.named_parameters():
            if ".experts." in n and "lora_B" in n:
                p.normal_(0, 0.5)
        assert not torch.allclose(layer.block(x), before)


def test_full_scope_trains_every_parameter_without_adapters():
    model = tiny_model("qwen2_moe")
    assert add_lora(model, "full") is model
    assert all(p.requires_grad for p in model.parameters())
    assert not lora_module_names(model)


def test_lora_initialisation_is_seeded():
    def lora_a(seed):
        wrapped = add_lora(tiny_model("olmoe"), "attention", seed=seed)
        return torch.cat([p.flatten() for n, p in wrapped.named_parameters() if "lora_A" in n])

    assert torch.equal(lora_a(3), lora_a(3))
    assert not torch.equal(lora_a(3), lora_a(4))


def test_placement_check_catches_lora_on_mlp_names():
    """The pitfall: MLP names also match the shared expert (and "all-linear" the router)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen2_moe"),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]))
    with pytest.raises(FlexmoeError, match=r"LoRA landed on 'model.layers.0.mlp.shared_expert.gate_proj'"):
        check_lora_placement(model, "attention")


def test_refuses_unknown_scope_and_double_wrapping():
    with pytest.raises(FlexmoeError, match="unknown LoRA scope 'mlp'"):
        add_lora(tiny_model("mixtral"), "mlp")
    with pytest.raises(FlexmoeError, match="already carries PEFT adapters"):
        add_lora(add_lora(tiny_model("mixtral")), "attention")


def test_split_parameters_by_role():
    batches = token_batches()
    model = tiny_model("deepseek_v2")
    graft(model, select_experts(model, batches))
    wrapped = add_lora(model, "attention")
    roles = Roles(shared=("attention_lora",), personal=("graft",))
    split = apply_roles(wrapped, roles)
    assert split.shared and all("lora_" in n for n in split.shared)
    assert split.personal and all(".graft." in n for n in split.personal)
    assert not any(p.requires_grad for p in split.frozen.values())
    assert all(p.requires_grad for p in (*split.shared.values(), *split.personal.values()))
    everything = dict(wrapped.named_parameters())
    assert set(split.shared) | set(split.personal) | set(split.frozen) == set(everything)
    assert list(split.trainable) == [n for n in everything if n in split.shared or n in split.personal]
    assert split.numel("shared") + split.numel("personal") + split.numel("frozen") == sum(
        p.numel() for p in everything.values())


def test_roles_not_requires_grad_decide_the_split():
    """Roles are read from the model's structure: a parameter switched on by hand stays frozen."""
    wrapped = add_lora(tiny_model("qwen2_moe"), "attention")
    roles = Roles(shared=("attention_lora",))
    router = next(p for n, p in wrapped.named_parameters() if n.endswith("mlp.gate.weight"))
    router.requires_grad_(True)
    split = split_parameters(wrapped, roles)
    assert all("lora_" in n for n in split.shared) and any(p is router for p in split.frozen.values())
    apply_roles(wrapped, roles)
    assert not router.requires_grad


def test_shared_state_round_trip():
    wrapped = add_lora(tiny_model("granitemoe"), "attention", seed=1)
    roles = Roles(shared=("attention_lora",))
    state = {k: v + 1.0 for k, v in shared_state(wrapped, roles).items()}
    set_shared_state(wrapped, roles, state)
    assert all(torch.equal(v, state[k]) for k, v in shared_state(wrapped, roles).items())
    with pytest.raises(FlexmoeError, match="missing"):
        set_shared_state(wrapped, roles, dict(list(state.items())[1:]))


def test_federated_routers_join_the_shared_part(family):
    model = tiny_model(family)
    graft(model, select_experts(model, token_batches()))
    wrapped = add_lora(model, "attention")
    split = apply_roles(wrapped, Roles(shared=("attention_lora", "routers"), personal=("graft",)))
    names = [n for n in split.shared if "lora_" not in n]
    router_attr = FAMILIES[family].router
    assert len(names) == len(moe_layers(wrapped)) and all(f".{router_attr}." in n for n in names)
    assert all(wrapped.get_parameter(n).requires_grad for n in names)
    split = apply_roles(wrapped, Roles(shared=("attention_lora",), personal=("graft",)))
    assert set(names) <= set(split.frozen) and not any(wrapped.get_parameter(n).requires_grad for n in names)
