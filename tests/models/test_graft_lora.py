"""The graft trained as its authors most likely train it (`flex.graft_train = "lora"`: a frozen copy
under LoRA, the gate trainable), the personal learning rate (`train.personal_lr`), and the personal
state a LoRA-mode client stores (selection, gate and LoRA; the copy rebuilt from the base)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from flexmoe.config import load_config
from flexmoe.engine.restore import restore
from flexmoe.errors import FlexmoeError
from flexmoe.cost.comm import serialized_size
from flexmoe.methods.build import build_method
from flexmoe.methods.fedper.method import graft_params, matched_rank
from flexmoe.models import (
    GraftTraining, extract_expert, graft, grafts, load_graft, moe_layers, graft_state, read_graft,
    save_graft, select_experts, set_graft_state,
)
from flexmoe.models.graft import fold_graft_lora, grafts_disabled, new_graft
from flexmoe.models.roles import apply_roles
from flexmoe.cost.plan import plan
from flexmoe.train.loop import _make_optimizer, personal_lr

from helpers.paths import REPO_ROOT
from helpers.tiny import tiny_model, token_batches
from helpers.usage import command, logits, train

# The tiny random qwen2_moe (helpers/tiny.py): 2 MoE layers, hidden H=32, expert width I=16.
# LoRA of rank r on gate/up (H -> I) and down (I -> H): 3 * r * (H + I) = 144 r per expert; the gate H + 1 = 33.
# r=4, k=1: 576 + 33 = 609 per layer, 1218 for 2 layers (the full copy: 3138, test_controls.py).
LORA4 = GraftTraining("lora", r=4, alpha=8.0)
GRAFT_LORA4_K1 = 1218


def lora_grafted(selection: list[int] | None = None, training: GraftTraining = LORA4, seed: int = 0):
    model = tiny_model("qwen2_moe")
    chosen = select_experts(model, token_batches()) if selection is None else \
        {layer.name: selection for layer in moe_layers(model)}
    graft(model, chosen, gate_init_bias=1.0, seed=seed, training=training)
    return model


def trained_a_little(model, seed: int = 0) -> None:
    """Random values in every trainable graft tensor (LoRA B included, so the LoRA changes the output)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in grafts(model).values():
            for param in module.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))


def test_a_lora_graft_starts_as_the_copy_and_trains_only_its_lora_and_gate():
    full, lora = tiny_model("qwen2_moe"), tiny_model("qwen2_moe")
    selection = select_experts(full, token_batches())
    graft(full, selection, gate_init_bias=1.0)
    graft(lora, selection, gate_init_bias=1.0, training=LORA4)
    x = token_batches()[0]
    assert torch.equal(full(input_ids=x).logits, lora(input_ids=x).logits)  # LoRA's B starts at zero
    for layer in moe_layers(lora):
        module = grafts(lora)[layer.name]
        expert = extract_expert(layer, selection[layer.name][0])
        assert torch.equal(module.experts[0].gate_proj.base_layer.weight, expert.gate_proj.weight)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_" in n or n.startswith("gate.") for n in trainable)
        assert not any(p.requires_grad for n, p in module.named_parameters() if ".base_layer." in n)
    assert sum(p.numel() for g in grafts(lora).values() for p in g.parameters() if p.requires_grad) == GRAFT_LORA4_K1
    loss = lora(input_ids=x, labels=x).loss
    loss.backward()
    module = next(iter(grafts(lora).values()))
    assert not module.experts[0].down_proj.lora_A["graft"].weight.grad.any()  # B = 0: A gets a zero gradient
    assert module.experts[0].down_proj.lora_B["graft"].weight.grad.abs().sum() > 0
    assert module.gate.weight.grad.abs().sum() > 0


def test_roles_keep_the_frozen_copy_frozen_and_the_graft_lora_personal():
    method = build_method(load_config(None, ["flex.graft_train=lora", "flex.graft_r=4", "lora.r=2"]))
    model = method.prepare_model(tiny_model("qwen2_moe"))
    graft(model, {layer.name: [1] for layer in moe_layers(model)}, training=LORA4)
    split = apply_roles(model, method.roles)
    assert split.personal and all(".graft." in n and ".base_layer." not in n for n in split.personal)
    assert sum(p.numel() for p in split.personal.values()) == GRAFT_LORA4_K1
    assert split.shared and all(".self_attn." in n for n in split.shared)  # the graft's LoRA is not shared
    copies = [n for n in split.frozen if ".graft." in n]
    assert copies and all(".base_layer." in n for n in copies)


def test_fedper_matches_the_trainable_count_of_either_graft():
    model = tiny_model("qwen2_moe")
    assert graft_params(model, 1, "sigmoid", LORA4) == GRAFT_LORA4_K1
    assert matched_rank(model, 1, "sigmoid", LORA4) == 1  # 1218 / 1792 per rank = 0.68 -> 1
    big = GraftTraining("lora", r=16, alpha=32.0)  # 3 * 16 * 48 + 33 = 2337 per layer, 4674: 2.61 -> 3
    assert graft_params(model, 1, "sigmoid", big) == 4674 and matched_rank(model, 1, "sigmoid", big) == 3
    for overrides, rank in ((["flex.graft_r=16"], 3), (["flex.graft_train=full"], 2)):
        method = build_method(load_config(None, ["method=fedper", "lora.r=2", *overrides]))
        assert method.expert_rank(model) == rank, overrides


def test_lora_personal_state_holds_no_copy_and_is_rebuilt_from_the_base(tmp_path):
    model = lora_grafted()
    trained_a_little(model)
    state = graft_state(model)
    assert state and not any(".base_layer." in key for key in state)
    path = save_graft(model, tmp_path / "personal.safetensors")
    _, metadata = read_graft(path)
    assert metadata["graft_train"] == "lora" and metadata["graft_r"] == "4"
    fresh = tiny_model("qwen2_moe")  # ungrafted: load_graft grafts with the file's selection and training
    load_graft(fresh, path)
    x = token_batches()[1]
    assert torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)
    # bytes on disk: the file is what `serialized_size` (flexmoe plan) counts, and a fraction of a full copy's
    full = lora_grafted(training=GraftTraining())
    full_path = save_graft(full, tmp_path / "full.safetensors")
    assert path.stat().st_size == serialized_size(state, _metadata(path))
    assert path.stat().st_size < full_path.stat().st_size
    ids = 2 * 8  # one int64 expert id per layer
    assert sum(t.numel() * t.element_size() for t in state.values()) == 4 * GRAFT_LORA4_K1 + ids
    assert sum(t.numel() * t.element_size() for t in graft_state(full).values()) == 4 * 3138 + ids


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as reader:
        return reader.metadata()


def test_swapping_clients_rebuilds_each_ones_frozen_copy(tmp_path):
    a, b = lora_grafted([1], seed=1), lora_grafted([3], seed=2)
    trained_a_little(a, 1)
    trained_a_little(b, 2)
    path_a, path_b = save_graft(a, tmp_path / "a.safetensors"), save_graft(b, tmp_path / "b.safetensors")
    x = token_batches()[0]
    server = lora_grafted([5])  # one instance serving both clients in turn
    for path, reference in ((path_b, b), (path_a, a), (path_b, b)):
        load_graft(server, path, adopt_selection=True)
        assert torch.equal(server(input_ids=x).logits, reference(input_ids=x).logits)
    in_memory = graft_state(a)
    set_graft_state(server, in_memory)
    assert torch.equal(server(input_ids=x).logits, a(input_ids=x).logits)


def test_a_file_of_the_other_training_is_refused(tmp_path):
    path = save_graft(lora_grafted([1]), tmp_path / "lora.safetensors")
    with pytest.raises(FlexmoeError, match="graft trains as"):
        load_graft(lora_grafted([1], training=GraftTraining()), path, adopt_selection=True)
    with pytest.raises(FlexmoeError, match="graft trains as"):
        load_graft(lora_grafted([1], training=GraftTraining("lora", r=8, alpha=8.0)), path, adopt_selection=True)


@pytest.mark.parametrize("overrides, message", [
    (["flex.graft_train=lora", "flex.graft_init=zero"], "graft_init"),
    (["flex.graft_train=partly"], "flex.graft_train"),
    (["flex.graft_r=0"], "flex.graft_r"),
    (["train.personal_lr=-1"], "train.personal_lr"),
])
def test_bad_recipes_are_one_line(overrides, message):
    with pytest.raises(FlexmoeError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("method", ["fedavg", "local", "fcmoe"])
def test_personal_lr_is_refused_where_nothing_is_personal(method):
    with pytest.raises(FlexmoeError, match=f"train.personal_lr.*{method!r} has no personal part"):
        build_method(load_config(None, [f"method={method}", "train.personal_lr=1e-4"]))
    for ok in ("flex", "flex+fcmoe", "fedper", "fedavg-ft"):
        build_method(load_config(None, [f"method={ok}", "train.personal_lr=1e-4"]))


def test_personal_lr_follows_the_shared_schedule():
    train = load_config(None, ["train.lr=4e-5", "train.min_lr_ratio=0.025", "train.personal_lr=1e-3"]).train
    assert personal_lr(train, 1, 5) == pytest.approx(1e-3) and personal_lr(train, 5, 5) == pytest.approx(2.5e-5)
    shared = load_config(None, ["train.personal_lr=0"]).train
    assert personal_lr(shared, 3, 5) == pytest.approx(0.5 * (4e-3 + 4e-4))  # 0 = the shared rate
    flex = load_config(None, []).train  # not set: the method's own (FLEx: 4e-5, on lr's schedule)
    assert flex.personal_lr == 4e-5 and personal_lr(flex, 3, 5) == pytest.approx(0.5 * (4e-5 + 4e-6))
    for method in ("fedper", "fedavg-ft", "fedavg"):  # the other methods train at lr unless told
        assert load_config(None, [f"method={method}"]).train.personal_lr == 0.0
    assert load_config(None, ["method=flex+fcmoe"]).train.personal_lr == 4e-5


def test_sgd_steps_personal_parameters_at_their_own_rate():
    shared, own = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    params = {"shared": shared, "own": own}
    config = load_config(None, ["train.optimizer=sgd"]).train
    optimizer = _make_optimizer(params, config, 0.1, {"own": 0.01})
    (shared.sum() + own.sum()).backward()  # both gradients 1
    optimizer.step()
    assert torch.allclose(shared.detach(), torch.full((3,), 0.9)) and torch.allclose(own.detach(), torch.full((3,), 0.99))
    assert len(_make_optimizer(params, config, 0.1, {}).param_groups) == 1  # the default: one group, as before


def test_plan_counts_the_stored_lora_graft():
    grafted = plan(load_config(None, ["flex.graft_train=full"]), batch=1, length=16)
    lora = plan(load_config(None, ["flex.graft_r=4"]), batch=1, length=16)  # the default: a LoRA graft
    assert 0 < lora.personal_state_bytes < 0.2 * grafted.personal_state_bytes
    assert lora.trainable_params < grafted.trainable_params


# ---- a LoRA-mode run: resume, eval, export -------------------------------------------------
LORA_RUN = ("flex.graft_train=lora", "flex.graft_r=4", "train.personal_lr=5e-2")


@pytest.fixture(scope="module")
def lora_run(workdir, model_dir, data_file):  # noqa: F811
    return train(model_dir, data_file, workdir / "lora-run", *LORA_RUN)


@pytest.mark.slow
def test_a_lora_run_resumes_to_the_uninterrupted_metrics(lora_run, model_dir, data_file, tmp_path):  # noqa: F811
    from flexmoe.engine.simulation import Simulation
    from helpers.engine import assert_same_safetensors, metrics

    config = load_config(lora_run / "config.toml")
    Simulation(config, tmp_path / "cut").run(stop_after=1)
    Simulation.resume(tmp_path / "cut")
    assert metrics(tmp_path / "cut") == metrics(lora_run)
    for client in range(4):
        assert_same_safetensors(lora_run / "clients" / str(client) / "personal.safetensors",
                                tmp_path / "cut" / "clients" / str(client) / "personal.safetensors")
    trains = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    rates = sorted({(r["lr"], r["personal_lr"]) for r in trains if r["kind"] == "train"}, reverse=True)
    assert [x for pair in rates for x in pair] == pytest.approx([2e-2, 5e-2, 2e-3, 5e-3])  # cosine, floor 0.1, both


def test_folding_the_graft_lora_leaves_a_plain_full_copy_with_the_same_output():
    model = lora_grafted([1])
    trained_a_little(model)
    tokens = token_batches()[0]
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    fold_graft_lora(model)
    with torch.no_grad():
        after = model(input_ids=tokens).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    reference = lora_grafted([1])  # the same graft, unfolded
    trained_a_little(reference)
    for layer in moe_layers(model):
        module = grafts(model)[layer.name]
        expected = set(new_graft(layer, 1, "sigmoid").state_dict())
        assert set(module.state_dict()) == expected  # the keys of a plain ExpertGraft, which the export rebuilds
        assert all(type(getattr(module.experts[0], n)) is torch.nn.Linear for n in ("gate_proj", "up_proj", "down_proj"))
        # the folded weight is W + (alpha / r) * B @ A, by hand from the LoRA-mode graft
        up = grafts(reference)[layer.name].experts[0].up_proj
        folded = up.base_layer.weight + (LORA4.alpha / LORA4.r) * up.lora_B["graft"].weight @ up.lora_A["graft"].weight
        torch.testing.assert_close(module.experts[0].up_proj.weight, folded)
    assert fold_graft_lora(model) is model  # a second fold: nothing left to fold


def test_a_lora_client_stores_no_copy_and_restores_exactly(lora_run):
    stored, metadata = read_graft(lora_run / "clients" / "0" / "personal.safetensors")
    assert metadata["graft_train"] == "lora" and not any(".base_layer." in key for key in stored)
    restored = restore(lora_run, 0)
    state = graft_state(restored.model)
    assert set(state) == set(stored) and all(torch.equal(state[k], stored[k]) for k in stored)
    for layer in moe_layers(restored.model):  # the frozen copy is the base's expert, untouched by training
        module = grafts(restored.model)[layer.name]
        expert = extract_expert(layer, module.expert_ids.tolist()[0])
        assert torch.equal(module.experts[0].up_proj.base_layer.weight, expert.up_proj.weight)
        assert module.experts[0].up_proj.lora_B["graft"].weight.abs().sum() > 0  # its LoRA trained


def test_a_lora_run_evaluates_and_exports_like_the_run(lora_run, tmp_path, capsys):
    import flexmoe

    assert command("eval", ["--run", str(lora_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    last = {r["client"]: r for r in records if r["kind"] == "eval" and r["round"] == 2}
    for record in result["clients"]:
        assert record["test_loss"] == pytest.approx(last[record["client"]]["test_loss"], rel=1e-6)
    out = tmp_path / "client1"
    assert command("export", ["--run", str(lora_run), "--client", "1", "--out", str(out)]) == 0
    # the export holds plain full copies (the graft's LoRA folded in): no PEFT name, no PEFT to load it
    with safe_open(out / "model.safetensors", framework="pt") as reader:
        keys = list(reader.keys())
    assert any(".graft.experts.0.up_proj.weight" in key for key in keys)
    assert not any("lora_" in key or ".base_layer." in key for key in keys)
    assert json.loads((out / "config.json").read_text())["flexmoe_grafts"]["class"] == "ExpertGraft"
    model, tokenizer = flexmoe.load_personalized(out)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    exported = logits(model, tokenizer)
    assert torch.equal(logits(plain, tokenizer), exported)  # the exported code, the same model
    # against the run: folding W + s*B@A into one matrix rounds differently from W@x + s*B@(A@x),
    # so the logits agree to float32 rounding, not bit for bit; the graft moves them far more than that
    reference = restore(lora_run, 1)
    expected = logits(reference.model, reference.tokenizer)
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)
    with grafts_disabled(reference.model):
        assert (logits(reference.model, reference.tokenizer) - expected).abs().max() > 1e-3
    assert command("generate", ["--run", str(lora_run), "--client", "1", "--prompt", "describe the word cat"]) == 0
    assert capsys.readouterr().out.strip()


def test_the_authors_recipe_file_loads_with_lora_on_q_k_v_only():
    from flexmoe.models import lora_module_names
    from flexmoe.train.loop import cosine_lr

    config = load_config(REPO_ROOT / "configs" / "flex-lora-graft.toml")
    assert config.flex.graft_train == "lora" and config.flex.graft_r == 32 and config.lora.r == 32
    assert cosine_lr(config.train, 1, config.rounds) == 4e-5
    assert cosine_lr(config.train, config.rounds, config.rounds) == pytest.approx(1e-6)
    model = build_method(config).prepare_model(tiny_model("qwen2_moe"))
    placed = lora_module_names(model)
    assert {name.rsplit(".", 1)[1] for name in placed} == {"q_proj", "k_proj", "v_proj"} and len(placed) == 2 * 3
    default = build_method(load_config(None, [])).prepare_model(tiny_model("qwen2_moe"))
    assert {name.rsplit(".", 1)[1] for name in lora_module_names(default)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(FlexmoeError, match="lora.attention: 'w_proj' is not an attention projection of qwen2_moe"):
        build_method(load_config(None, ['lora.attention=["q_proj", "w_proj"]'])).prepare_model(tiny_model("qwen2_moe"))
