"""Personal state (grafted experts + gates): in-memory swap, safetensors round trip, refusals."""

from __future__ import annotations

import pytest
import torch

from flexmoe.errors import FlexmoeError
from flexmoe.models import (
    add_lora,
    base_fingerprint,
    current_selection,
    graft,
    load_graft,
    moe_layers,
    graft_state,
    read_graft,
    save_graft,
    select_experts,
    set_graft_state,
)

from helpers.tiny import tiny_model, token_batches


def trained_like_graft(model, selection, seed=0):
    """Graft, then move the graft away from its initial copy as local training would."""
    graft(model, selection, gate_init_bias=-1.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".graft." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def selection_of(model, offset):
    return {layer.name: [offset % layer.num_experts] for layer in moe_layers(model)}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_personal_state_round_trips_through_one_file(family, tmp_path):
    ids = token_batches()[0]
    client = trained_like_graft(tiny_model(family), select_experts(tiny_model(family), token_batches()))
    path = save_graft(client, tmp_path / "client" / "personal.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["personal.safetensors"]  # no temp file left

    restored = load_graft(tiny_model(family), path)  # an ungrafted base is grafted from the file
    assert current_selection(restored) == current_selection(client)
    expected = graft_state(client)
    assert all(torch.equal(value, expected[key]) for key, value in graft_state(restored).items())
    assert set(graft_state(restored)) == set(expected)
    assert torch.equal(logits(restored, ids), logits(client, ids))


def test_personal_state_loads_into_a_peft_wrapped_model(tmp_path):
    ids = token_batches()[0]
    client = trained_like_graft(tiny_model("qwen2_moe"), selection_of(tiny_model("qwen2_moe"), 3))
    save_graft(client, tmp_path / "p.safetensors")
    wrapped = add_lora(tiny_model("qwen2_moe"), "attention")  # LoRA B = 0: same function as the base
    load_graft(wrapped, tmp_path / "p.safetensors")
    assert any(".graft." in n and p.requires_grad for n, p in wrapped.named_parameters())
    torch.testing.assert_close(logits(wrapped, ids), logits(client, ids), rtol=0, atol=1e-6)


def test_metadata_records_base_selection_and_gate(tmp_path):
    model = trained_like_graft(tiny_model("olmoe"), selection_of(tiny_model("olmoe"), 5))
    _, metadata = read_graft(save_graft(model, tmp_path / "p.safetensors"))
    assert metadata["base"] == base_fingerprint(model)
    assert metadata["k"] == "1" and metadata["gate"] == "sigmoid"
    assert metadata["selection"] == '{"model.layers.0.mlp": [5], "model.layers.1.mlp": [5]}'


def test_another_selection_is_refused_unless_adopted(tmp_path):
    ids = token_batches()[0]
    client = trained_like_graft(tiny_model("mixtral"), selection_of(tiny_model("mixtral"), 1))
    path = save_graft(client, tmp_path / "p.safetensors")
    other = trained_like_graft(tiny_model("mixtral"), selection_of(tiny_model("mixtral"), 2), seed=1)
    with pytest.raises(FlexmoeError, match=r"layer model.layers.0.mlp was grafted from experts \[1\], the model "
                                           r"carries experts \[2\]"):
        load_graft(other, path)
    load_graft(other, path, adopt_selection=True)
    assert current_selection(other) == current_selection(client)
    assert torch.equal(logits(other, ids), logits(client, ids))


def test_another_base_is_refused(tmp_path):
    path = save_graft(trained_like_graft(tiny_model("mixtral"), selection_of(tiny_model("mixtral"), 1)),
                         tmp_path / "p.safetensors")
    with pytest.raises(FlexmoeError, match="a different base model"):
        load_graft(tiny_model("mixtral", seed=1), path)


def test_fingerprint_ignores_dtype_but_not_weights():
    model = tiny_model("qwen3_moe")
    assert base_fingerprint(model) == base_fingerprint(tiny_model("qwen3_moe").to(torch.bfloat16))
    assert base_fingerprint(model) != base_fingerprint(tiny_model("qwen3_moe", seed=2))


def test_another_k_or_gate_is_refused(tmp_path):
    path = save_graft(trained_like_graft(tiny_model("mixtral"), selection_of(tiny_model("mixtral"), 1)),
                         tmp_path / "p.safetensors")
    model = tiny_model("mixtral")
    graft(model, selection_of(model, 1), gate="none")
    with pytest.raises(FlexmoeError, match="k=1, gate=sigmoid; the model is grafted with k=1, gate=none"):
        load_graft(model, path, adopt_selection=True)


def test_missing_or_foreign_files_are_refused(tmp_path):
    model = tiny_model("mixtral")
    with pytest.raises(FlexmoeError, match="does not exist"):
        load_graft(model, tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FlexmoeError, match="not a readable safetensors file"):
        load_graft(model, tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(FlexmoeError, match="not a flexmoe personal state file"):
        load_graft(model, tmp_path / "other.safetensors")


def test_unwritable_destination_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    model = trained_like_graft(tiny_model("mixtral"), selection_of(tiny_model("mixtral"), 0))
    with pytest.raises(FlexmoeError, match=r"cannot write personal state to '.*file/p.safetensors'"):
        save_graft(model, tmp_path / "file" / "p.safetensors")


def test_ungrafted_model_has_no_personal_state():
    with pytest.raises(FlexmoeError, match="carries no graft"):
        graft_state(tiny_model("mixtral"))


def test_one_model_instance_serves_many_clients():
    """Swap clients' personal tensors in and out of one grafted model, as the simulation engine does."""
    ids = token_batches()[0]
    clients = {c: trained_like_graft(tiny_model("deepseek_v3"), selection_of(tiny_model("deepseek_v3"), c), seed=c)
               for c in (1, 4)}
    shared = trained_like_graft(tiny_model("deepseek_v3"), selection_of(tiny_model("deepseek_v3"), 0))
    for c, client in clients.items():
        set_graft_state(shared, graft_state(client))
        assert current_selection(shared) == current_selection(client)
        assert torch.equal(logits(shared, ids), logits(client, ids))


def test_set_personal_state_refuses_foreign_tensors():
    model = trained_like_graft(tiny_model("mixtral"), selection_of(tiny_model("mixtral"), 0))
    state = graft_state(model)
    key = next(iter(state))
    with pytest.raises(FlexmoeError, match="missing"):
        set_graft_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(FlexmoeError, match=rf"{key}: shape"):
        set_graft_state(model, {**state, key: torch.zeros(3)})
