"""Expert selection and grafting on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexmoe.errors import FlexmoeError
from flexmoe.models import (
    add_lora,
    current_selection,
    extract_expert,
    graft,
    grafts,
    moe_layers,
    select_experts,
    ungraft,
)

from helpers.tiny import FAMILY_NAMES, JITTERING, VOCAB, tiny_model, token_batches

ALL_TOKENS = 10_000  # a cap above the test batches' token count: no subsampling


# -- references computed independently of flexmoe's capture -----------------------------------


def block_inputs_and_routed_outputs(model, batches):
    """Per MoE layer: block input X (tokens, H) and routed output R = block output - shared expert."""
    layers = moe_layers(model)
    seen = {layer.name: ([], []) for layer in layers}

    def recorder(layer):
        def hook(block, args, output):
            x = args[0].reshape(-1, layer.hidden_size)
            y = output.reshape(-1, layer.hidden_size)
            if layer.family.model_type == "qwen2_moe":
                y = y - torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
            elif layer.shared_expert is not None:
                y = y - layer.shared_expert(x)
            seen[layer.name][0].append(x)
            seen[layer.name][1].append(y)
        return hook

    handles = [layer.block.register_forward_hook(recorder(layer)) for layer in layers]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for handle in handles:
        handle.remove()
    return {name: (torch.cat(xs), torch.cat(rs)) for name, (xs, rs) in seen.items()}


def routed_scale(model) -> float:
    deepseek = model.config.model_type.startswith("deepseek")
    return getattr(model.config, "routed_scaling_factor", 1.0) if deepseek else 1.0


def restricted_weights(layer, x, subset):
    """Weights of the router restricted to `subset`: its scores renormalised over the subset."""
    logits = x.float() @ layer.router.weight.float().T
    scores = torch.sigmoid(logits) if layer.family.score == "sigmoid" else torch.softmax(logits, dim=-1)
    kept = scores[:, subset]
    return kept / kept.sum(-1, keepdim=True)


def brute_force_loss(layer, x, r, subset, scale):
    with torch.no_grad():
        weights = restricted_weights(layer, x, subset)
        pred = sum(weights[:, j : j + 1] * extract_expert(layer, e)(x) for j, e in enumerate(subset))
        return float(((r - scale * pred) ** 2).sum(-1).mean())


# -- experts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_extracted_expert_equals_fused_expert(family, implementation):
    model = tiny_model(family, experts_implementation=implementation)
    x = torch.randn(9, model.config.hidden_size)
    for layer in moe_layers(model):
        for expert in range(layer.num_experts):
            routed_to_one = layer.block.experts(x, torch.full((9, 1), expert), torch.ones(9, 1))
            torch.testing.assert_close(extract_expert(layer, expert)(x), routed_to_one, rtol=1e-5, atol=1e-6)


def test_moe_layers_skip_dense_layers_and_name_blocks():
    model = tiny_model("deepseek_v2")  # first_k_dense_replace=1
    assert [layer.name for layer in moe_layers(model)] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    sparse = tiny_model("qwen2_moe", mlp_only_layers=[0])  # qwen's dense-MLP layers
    assert [layer.name for layer in moe_layers(sparse)] == ["model.layers.1.mlp"]
    granite = moe_layers(tiny_model("granitemoe"))
    assert [layer.name for layer in granite] == ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"]
    assert all(layer.router is layer.block.router for layer in granite)


def test_moe_layers_see_through_peft(family, model):
    names = [layer.name for layer in moe_layers(model)]
    wrapped = add_lora(model, "attention")
    assert [layer.name for layer in moe_layers(wrapped)] == names


def test_dense_model_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(FlexmoeError, match=r"LlamaForCausalLM \(model_type 'llama'\) is not a supported"):
        moe_layers(dense)


# -- selection -----------------------------------------------------------------------------------


def test_selection_equals_brute_force_per_expert_loop(family, model, batches):
    selection = select_experts(model, batches, k=1, max_tokens=ALL_TOKENS)
    captured = block_inputs_and_routed_outputs(model, batches)
    scale = routed_scale(model)
    for layer in moe_layers(model):
        x, r = captured[layer.name]
        losses = [brute_force_loss(layer, x, r, [e], scale) for e in range(layer.num_experts)]
        assert selection[layer.name] == [min(range(len(losses)), key=losses.__getitem__)]
        torch.testing.assert_close(torch.tensor(selection.losses[layer.name]), torch.tensor(losses), rtol=1e-4, atol=0)
        ranked = sorted(losses)
        assert selection.margins[layer.name] == pytest.approx(ranked[1] - ranked[0], rel=1e-3)
        assert selection.tokens[layer.name] == len(x)


def test_greedy_k2_equals_brute_force_greedy(family, model, batches):
    selection = select_experts(model, batches, k=2, max_tokens=ALL_TOKENS)
    captured = block_inputs_and_routed_outputs(model, batches)
    scale = routed_scale(model)
    for layer in moe_layers(model):
        x, r = captured[layer.name]
        first = min(range(layer.num_experts), key=lambda e: brute_force_loss(layer, x, r, [e], scale))
        pair_losses = {e: brute_force_loss(layer, x, r, [first, e], scale)
                       for e in range(layer.num_experts) if e != first}
        second = min(pair_losses, key=pair_losses.get)
        assert selection[layer.name] == [first, second]
        ranked = sorted(pair_losses.values())
        assert selection.margins[layer.name] == pytest.approx(ranked[1] - ranked[0], rel=1e-3, abs=1e-6)


def test_selection_subsamples_tokens_deterministically():
    model = tiny_model("qwen3_moe")
    batches = token_batches(batches=3, length=20)
    first = select_experts(model, batches, max_tokens=16, seed=3)
    again = select_experts(model, batches, max_tokens=16, seed=3)
    assert set(first.tokens.values()) == {16}
    assert dict(first) == dict(again) and first.losses == again.losses
    other = select_experts(model, batches, max_tokens=16, seed=4)
    assert other.losses != first.losses  # another uniform sample of the 120 tokens


def test_selection_ignores_padding():
    model = tiny_model("olmoe")
    short, long = torch.randint(3, VOCAB, (1, 5)), torch.randint(3, VOCAB, (1, 9))
    padded = torch.cat([F.pad(short, (0, 4), value=0), long])
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    on_padded = select_experts(model, [{"input_ids": padded, "attention_mask": mask}], max_tokens=ALL_TOKENS)
    on_unpadded = select_experts(model, [short, long], max_tokens=ALL_TOKENS)
    assert dict(on_padded) == dict(on_unpadded)
    assert on_padded.tokens == on_unpadded.tokens == {name: 14 for name in on_padded}
    for name in on_padded:
        torch.testing.assert_close(torch.tensor(on_padded.losses[name]), torch.tensor(on_unpadded.losses[name]),
                                   rtol=1e-4, atol=1e-7)


def test_selection_calibrates_on_supervised_tokens_when_labels_are_given(batches):
    model = tiny_model("qwen2_moe")
    labels = [ids.clone() for ids in batches]
    for label in labels:
        label[:, :5] = -100  # a masked-out prompt
    selection = select_experts(model, [{"input_ids": i, "labels": lab} for i, lab in zip(batches, labels)],
                               max_tokens=ALL_TOKENS)
    supervised = torch.cat([lab.reshape(-1) != -100 for lab in labels])
    captured = block_inputs_and_routed_outputs(model, batches)
    for layer in moe_layers(model):
        x, r = (t[supervised] for t in captured[layer.name])
        losses = [brute_force_loss(layer, x, r, [e], 1.0) for e in range(layer.num_experts)]
        assert selection[layer.name] == [min(range(len(losses)), key=losses.__getitem__)]
        assert selection.tokens[layer.name] == int(supervised.sum())
        torch.testing.assert_close(torch.tensor(selection.losses[layer.name]), torch.tensor(losses), rtol=1e-4, atol=0)


def test_frequency_picks_the_experts_the_router_chose_most(family, model, batches):
    selection = select_experts(model, batches, k=2, strategy="frequency")
    captured = block_inputs_and_routed_outputs(model, batches)
    for layer in moe_layers(model):
        with torch.no_grad():
            _, _, indices = layer.router(captured[layer.name][0])
        counts = torch.bincount(indices.reshape(-1), minlength=layer.num_experts)
        assert selection.counts[layer.name] == counts.tolist()
        assert selection[layer.name] == sorted(range(layer.num_experts), key=lambda e: (-counts[e], e))[:2]


def test_random_selection_is_seeded_and_valid():
    model = tiny_model("mixtral")
    first = select_experts(model, [], k=2, strategy="random", seed=5)
    assert first == select_experts(model, [], k=2, strategy="random", seed=5)
    assert any(select_experts(model, [], k=2, strategy="random", seed=s) != first for s in range(6, 12))
    for experts in first.values():
        assert len(set(experts)) == 2 and all(0 <= e < 4 for e in experts)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(k=4), r"k=4 grafted experts per layer: must be between 1 and 3"),
    (dict(k=0), r"k=0"),
    (dict(strategy="best"), r"unknown selection strategy 'best'"),
    (dict(max_tokens=0), r"max_tokens=0"),
])
def test_selection_refuses_bad_arguments(kwargs, message):
    with pytest.raises(FlexmoeError, match=message):
        select_experts(tiny_model("mixtral"), token_batches(), **kwargs)


def test_selection_refuses_empty_data():
    with pytest.raises(FlexmoeError, match="no tokens"):
        select_experts(tiny_model("mixtral"), [torch.zeros(1, 0, dtype=torch.long)])


# -- grafting ------------------------------------------------------------------------------------


def some_selection(model, k=1, offset=0):
    return {layer.name: [(offset + j) % layer.num_experts for j in range(k)] for layer in moe_layers(model)}


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_closed_gate_leaves_logits_exactly_unchanged(family, implementation, batches):
    model = tiny_model(family, experts_implementation=implementation)
    ids = batches[0]
    with torch.no_grad():
        base = model(ids).logits
        graft(model, some_selection(model, offset=1), gate_init_bias=-1e4)
        grafted = model(ids).logits
    assert torch.equal(grafted, base)


@pytest.mark.parametrize("family", JITTERING)
def test_closed_gate_is_exact_in_train_mode_for_jittering_families(family, batches):
    model = tiny_model(family).train()
    ids = batches[0]
    torch.manual_seed(7)
    base = model(ids).logits
    graft(model, some_selection(model), gate_init_bias=-1e4)
    torch.manual_seed(7)
    assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("family", JITTERING)
def test_graft_sees_the_block_input_before_in_place_jitter(family, batches):
    model = tiny_model(family).train()
    graft(model, some_selection(model), gate="none")
    layer = moe_layers(model)[0]
    norm = model.model.layers[layer.index].post_attention_layernorm
    seen = {}

    def keep(key, tensor):
        seen.setdefault(key, tensor.detach().clone())  # first call only; returns None: hooks change nothing

    norm.register_forward_hook(lambda m, a, out: keep("block_input", out))
    layer.block.graft.register_forward_pre_hook(lambda m, a: keep("graft_input", a[0]))
    layer.block.experts.register_forward_pre_hook(lambda m, a: keep("experts_input", a[0]))
    model(batches[0]).logits.sum().backward()  # the clone keeps autograd valid despite the in-place jitter
    assert torch.equal(seen["graft_input"], seen["block_input"])
    assert not torch.allclose(seen["experts_input"].reshape(seen["block_input"].shape), seen["block_input"])


def test_open_gate_changes_outputs(family, model, batches):
    ids = batches[0]
    with torch.no_grad():
        base = model(ids).logits
        graft(model, some_selection(model), gate_init_bias=0.0)
        assert not torch.allclose(model(ids).logits, base, atol=1e-4)


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
@pytest.mark.parametrize("k", [1, 2])
def test_grafted_block_adds_the_gated_expert_mix(family, gate, k):
    model = tiny_model(family)
    layer = moe_layers(model)[-1]
    x = torch.randn(2, 5, layer.hidden_size)
    selection = some_selection(model, k=k, offset=1)
    subset = selection[layer.name]
    with torch.no_grad():
        base = layer.block(x.clone())
        experts = [extract_expert(layer, e) for e in subset]
        graft(model, selection, gate=gate, gate_init_bias=-0.5)
        if gate == "sigmoid":
            layer.block.graft.gate.weight.normal_(0, 0.3)  # an input-dependent gate
        grafted = layer.block(x.clone())
        flat = x.reshape(-1, layer.hidden_size)
        weights = restricted_weights(layer, flat, subset)
        mix = sum(weights[:, j : j + 1] * mlp(flat) for j, mlp in enumerate(experts)).reshape(x.shape)
        mix = routed_scale(model) * mix
        if gate == "sigmoid":
            g = layer.block.graft.gate
            mix = torch.sigmoid(x @ g.weight.T + g.bias) * mix
    torch.testing.assert_close(grafted, base + mix, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_first", [False, True])
def test_only_lora_graft_and_gate_get_gradients(family, batches, lora_first):
    model = tiny_model(family).train()
    selection = select_experts(model, batches)
    if lora_first:
        model = add_lora(model, "attention")
        graft(model, selection)
    else:
        graft(model, selection)
        model = add_lora(model, "attention")
    ids = batches[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    expected = {name for name, _ in model.named_parameters() if "lora_" in name or ".graft." in name}
    assert with_grad == expected
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    assert any(".graft.gate." in name for name in with_grad)
    for part in (".graft.experts.", ".graft.gate.", "lora_B"):
        assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if part in n), part


def test_regraft_keeps_structure_and_swaps_selection():
    model = tiny_model("qwen2_moe")
    graft(model, some_selection(model, k=2))
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    graft(model, some_selection(model, k=2, offset=3))
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    assert current_selection(model) == some_selection(model, k=2, offset=3)
    with pytest.raises(FlexmoeError, match="already carries a graft with k=2"):
        graft(model, some_selection(model, k=1))


def test_graft_keeps_original_state_dict_keys(family, model):
    original = dict(model.state_dict())
    graft(model, some_selection(model))
    grafted = model.state_dict()
    assert set(original) <= set(grafted)
    assert all(".graft." in key for key in set(grafted) - set(original))
    assert all(torch.equal(grafted[key], value) for key, value in original.items())
    ungraft(model)
    assert set(model.state_dict()) == set(original) and not grafts(model)


@pytest.mark.parametrize(("selection", "message"), [
    ({"model.layers.0.mlp": [0]}, r"no expert for MoE layer 'model.layers.1.mlp'"),
    ({"model.layers.0.mlp": [0], "model.layers.1.mlp": [0], "model.layers.9.mlp": [0]}, r"'model.layers.9.mlp'"),
    ({"model.layers.0.mlp": [0], "model.layers.1.mlp": [4]}, r"layer model.layers.1.mlp: selected experts \[4\]"),
    ({"model.layers.0.mlp": [0], "model.layers.1.mlp": [1, 1]}, r"different numbers of experts"),
])
def test_graft_refuses_bad_selection(selection, message):
    with pytest.raises(FlexmoeError, match=message):
        graft(tiny_model("mixtral"), selection)


def test_graft_refuses_unknown_gate_or_infinite_bias():
    model = tiny_model("mixtral")
    with pytest.raises(FlexmoeError, match="unknown graft gate 'relu'"):
        graft(model, some_selection(model), gate="relu")
    with pytest.raises(FlexmoeError, match="gate_init_bias must be a finite number"):
        graft(model, some_selection(model), gate_init_bias=float("-inf"))


@pytest.mark.parametrize("family", FAMILY_NAMES[:1])
def test_selection_runs_with_grafts_disabled(family, batches):
    model = tiny_model(family)
    before = select_experts(model, batches, max_tokens=ALL_TOKENS)
    graft(model, some_selection(model, offset=1), gate_init_bias=3.0)  # a wide-open graft
    after = select_experts(model, batches, max_tokens=ALL_TOKENS)
    assert dict(after) == dict(before) and after.losses == before.losses


def test_bfloat16_model_selects_and_grafts(batches):
    model = tiny_model("qwen2_moe").to(torch.bfloat16)
    selection = select_experts(model, batches)
    with torch.no_grad():
        base = model(batches[0]).logits
        graft(model, selection, gate_init_bias=-1e4)
        # trainable: fp32 master weights on a half-precision base (the block still returns bf16)
        assert next(iter(grafts(model).values())).gate.weight.dtype == torch.float32
        assert torch.equal(model(batches[0]).logits, base)


def test_selection_is_the_same_through_peft(batches):
    model = tiny_model("deepseek_v2")
    plain = select_experts(model, batches, k=2)
    wrapped = select_experts(add_lora(model, "attention"), batches, k=2)
    assert dict(wrapped) == dict(plain) and wrapped.losses == plain.losses


def test_training_the_graft_alone_lowers_the_loss(batches):
    model = tiny_model("qwen3_moe").train()
    graft(model, select_experts(model, batches))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    ids = batches[0]
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(module.gate.bias.item() != -4.0 for module in grafts(model).values())
