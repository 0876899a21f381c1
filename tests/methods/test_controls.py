"""The study's controls for FLEx: FedPer (personal expert LoRA of the graft's size), FedAvg-FT
(FedAvg then local fine-tuning) and the zero-initialised graft; plus the compare variants."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import flexmoe.engine.client as client_side
import flexmoe.engine.local_clients as local_clients
from flexmoe.commands.compare import VARIANTS, parse_methods, plan
from flexmoe.config import RunConfig, load_config
from flexmoe.engine.evaluator import Evaluator
from flexmoe.engine.restore import restore
from flexmoe.methods.base import LocalRun
from flexmoe.methods.build import build_method
from flexmoe.methods.fedper.method import graft_params, matched_rank
from flexmoe.models import graft, grafts, moe_layers, select_experts
from flexmoe.models.roles import apply_roles, personal_disabled, personal_outside_graft, split_parameters
from flexmoe.report import run_label
from flexmoe.rundir import load_server
from flexmoe.wire import deserialize, serialize

from helpers.engine import metrics, run
from helpers.leaks import leaks
from helpers.tiny import tiny_model, token_batches

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


# The tiny random qwen2_moe (helpers/tiny.py): 2 MoE layers, hidden H=32, expert width I=16, E=8 experts.
# FLEx's graft per layer, k=1: gate/up/down 3*H*I = 1536, plus the gate's H+1 = 33 -> 1569; 2 layers: 3138.
# k=2: 2*1536 + router rows 2*H = 64 + 33 = 3169 -> 6338.
# Expert LoRA per unit of rank per layer: gate_up (E, 2I, H) E*(H+2I) = 512, down (E, H, I) E*(I+H) = 384 -> 896;
# 2 layers: 1792. Nearest rank: 3138/1792 = 1.75 -> 2; 6338/1792 = 3.54 -> 4.
GRAFT_K1, GRAFT_K2, LORA_PER_RANK = 3138, 6338, 1792


def fedper(*overrides: str):
    return build_method(load_config(None, ["method=fedper", *overrides]))


# ---- FedPer --------------------------------------------------------------------------------
def test_fedper_rank_zero_matches_the_graft_by_hand_count():
    model = tiny_model("qwen2_moe")
    assert graft_params(model, 1, "sigmoid") == GRAFT_K1 and graft_params(model, 2, "sigmoid") == GRAFT_K2
    assert matched_rank(model, 1, "sigmoid") == 2 and matched_rank(model, 2, "sigmoid") == 4
    grafted = tiny_model("qwen2_moe")  # the count equals a real graft's
    graft(grafted, {layer.name: [0] for layer in moe_layers(grafted)})
    assert sum(p.numel() for g in grafts(grafted).values() for p in g.parameters()) == GRAFT_K1
    for overrides, rank in (((), 2), (("flex.k=2",), 4), (("fedper.rank=5",), 5)):
        method = fedper("lora.r=2", "flex.graft_train=full", *overrides)  # the count of a full graft
        split = split_parameters(method.prepare_model(tiny_model("qwen2_moe")), method.roles)
        assert split.numel("personal") == rank * LORA_PER_RANK, overrides
        assert split.personal and all(".experts." in n and "lora_" in n for n in split.personal)
        assert split.shared and all(".self_attn." in n and "lora_" in n for n in split.shared)
        shared_ranks = {p.shape[0] for n, p in split.shared.items() if "lora_A" in n}
        assert shared_ranks == {2}  # lora.r, whatever the expert rank


def test_fedper_expert_lora_keeps_the_attention_lora_scale():
    method = fedper("lora.r=4", "lora.alpha=8", "fedper.rank=6")
    model = method.prepare_model(tiny_model("qwen2_moe"))
    experts = moe_layers(model)[0].block.experts
    attention = model.base_model.model.model.layers[0].self_attn.q_proj
    assert experts.r["default"] == 6 and attention.r["default"] == 4
    assert experts.scaling["default"] == attention.scaling["default"] == 2.0


def record_training(monkeypatch) -> list[dict]:
    """Every local training's trainable tensors at its start and its end, in training order."""
    seen = []
    original = client_side.local_train

    def recording(model, trainable, *args, **kwargs):
        start = {n: p.detach().clone() for n, p in trainable.items()}
        result = original(model, trainable, *args, **kwargs)
        seen.append({"start": start, "end": {n: p.detach().clone() for n, p in trainable.items()}})
        return result

    monkeypatch.setattr(client_side, "local_train", recording)
    return seen


def record_messages(monkeypatch) -> list[bytes]:
    sent = []
    monkeypatch.setattr(local_clients, "serialize", lambda t, m=None: sent.append(serialize(t, m)) or sent[-1])
    return sent


def test_fedper_personal_lora_stays_home_and_persists_across_rounds(model_dir, tmp_path, monkeypatch):
    trainings, sent = record_training(monkeypatch), record_messages(monkeypatch)
    global_personal = []  # the expert LoRA while the global model is evaluated: none (all zero)
    answers = Evaluator.answers

    def recording_answers(evaluator, client, round_index, model_kind):
        if model_kind == "global":
            held = personal_outside_graft(evaluator.model, evaluator.roles)
            global_personal.append([p.detach().clone() for p in held.values()])
        return answers(evaluator, client, round_index, model_kind)

    monkeypatch.setattr(Evaluator, "answers", recording_answers)
    run(model_dir, tmp_path, "method=fedper", "clients_per_round=4")  # rounds 1, 2: clients 0..3 in order
    assert len(global_personal) == 4 and all(not p.any() for held in global_personal for p in held)
    assert len(trainings) == 8 and sent
    personal = [n for n in trainings[0]["start"] if ".experts." in n]
    assert personal and not any(".experts." in key for blob in sent for key in deserialize(blob)[0])
    trained = {f"{i}:{n}": t["end"][n] for i, t in enumerate(trainings) for n in personal}
    assert leaks(trained, sent) == []  # no personal tensor, nor any row of one, in any message
    for client in range(4):
        first, second = trainings[client], trainings[4 + client]
        for name in personal:
            if "lora_B" in name:
                assert not first["start"][name].any()  # every client starts from LoRA's zero B
            assert not torch.equal(first["end"][name], first["start"][name]) or "lora_A" in name
            torch.testing.assert_close(second["start"][name], first["end"][name], rtol=0, atol=0)
        state = load_file(tmp_path / "clients" / str(client) / "state.safetensors")
        for name in personal:
            torch.testing.assert_close(state[f"personal.{name}"], second["end"][name], rtol=0, atol=0)
        restored = dict(restore(tmp_path, client).model.named_parameters())  # a fresh process's view
        for name in personal:
            torch.testing.assert_close(restored[name].detach(), second["end"][name], rtol=0, atol=0)
    ends = [trainings[4 + c]["end"][personal[1]] for c in range(4)]
    assert not torch.equal(ends[0], ends[1])  # personal: each client's own
    shared = [n for n in trainings[0]["start"] if n not in personal]
    for name in shared:  # the shared part: every client of a round starts from the same global weights
        assert all(torch.equal(trainings[4 + c]["start"][name], trainings[4]["start"][name]) for c in range(4))


def test_the_global_model_has_no_personal_lora():
    method = fedper("lora.r=2")
    model = method.prepare_model(tiny_model("qwen2_moe"))
    apply_roles(model, method.roles)
    ids = token_batches()[0]
    with torch.no_grad():
        base = model(ids).logits  # expert LoRA at its start: B = 0
        for p in personal_outside_graft(model, method.roles).values():
            p.normal_(0, 0.5)
        personal = model(ids).logits
        with personal_disabled(model, method.roles):
            torch.testing.assert_close(model(ids).logits, base)
        torch.testing.assert_close(model(ids).logits, personal, rtol=0, atol=0)
    assert not torch.allclose(personal, base)


# ---- FedAvg-FT -----------------------------------------------------------------------------
def test_fedavg_ft_is_fedavg_globally_and_personalises_with_the_last_trained_weights(model_dir, tmp_path,
                                                                                      monkeypatch):
    run(model_dir, tmp_path / "avg", "method=fedavg")
    trainings = record_training(monkeypatch)
    run(model_dir, tmp_path / "ft", "method=fedavg-ft")
    server = {name: load_file(tmp_path / name / "checkpoints" / "server.safetensors") for name in ("avg", "ft")}
    assert server["ft"].keys() == server["avg"].keys()
    for key, value in server["avg"].items():
        torch.testing.assert_close(server["ft"][key], value, rtol=0, atol=0)
    train = {name: [(r["round"], r["client"], r["loss"]) for r in metrics(tmp_path / name) if r["kind"] == "train"]
             for name in ("avg", "ft")}
    assert train["ft"] == train["avg"]
    last = {}  # each client's last local training (clients_per_round=2: some skip a round)
    for (_, client, _), training in zip(train["ft"], trainings, strict=True):
        last[client] = training["end"]
    global_weights = load_server(tmp_path / "ft")[1]
    for client in range(4):
        model = dict(restore(tmp_path / "ft", client).model.named_parameters())
        expected = last.get(client, global_weights)
        for name, value in expected.items():
            torch.testing.assert_close(model[name].detach(), value, rtol=0, atol=0)
    assert any(not torch.equal(last[c][n], global_weights[n]) for c in last for n in global_weights)


def test_fedavg_ft_client_that_never_trained_uses_the_global_weights():
    method = build_method(RunConfig(method="fedavg-ft"))
    global_weights, trained = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    assert method.eval_weights(global_weights, {}) is global_weights
    message, state = method.uplink(global_weights, trained, {}, LocalRun(steps=1, lr=1.0, num_examples=1))
    assert message is trained and torch.equal(method.eval_weights(global_weights, state)["w"], trained["w"])
    fine_tuned = {"w": torch.full((2,), 3.0)}  # trained again at train.personal_lr: kept, not sent
    run = LocalRun(steps=1, lr=1.0, num_examples=1, fine_tuned=fine_tuned)
    message, state = method.uplink(global_weights, trained, {}, run)
    assert message is trained and torch.equal(method.eval_weights(global_weights, state)["w"], fine_tuned["w"])


# ---- the zero-initialised graft -------------------------------------------------------------
def zero_grafted(seed: int, gate_init_bias: float = -4.0):
    model = tiny_model("qwen2_moe")
    selection = select_experts(model, token_batches())
    graft(model, selection, gate_init_bias=gate_init_bias, init="zero", seed=seed)
    return model, selection


def test_zero_graft_starts_at_zero_output_and_learns():
    model, selection = zero_grafted(seed=7, gate_init_bias=0.0)  # an open gate: only the graft can be zero
    base = tiny_model("qwen2_moe")
    ids = token_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
        x = torch.randn(5, 32)
        assert all(not g(x).any() for g in grafts(model).values())
    for layer in moe_layers(model):  # the selected expert's shape, not its weights
        mlp = grafts(model)[layer.name].experts[0]
        gate, up = layer.gate_up_proj[selection[layer.name][0]].chunk(2, dim=0)
        assert mlp.gate_proj.weight.shape == gate.shape and not torch.allclose(mlp.gate_proj.weight, gate)
        assert mlp.up_proj.weight.abs().max() <= 1 / 32 ** 0.5  # nn.Linear's bound, 1/sqrt(fan_in)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for module in grafts(model).values():
        assert module.experts[0].down_proj.weight.grad.abs().sum() > 0
    model.zero_grad()
    for module in grafts(model).values():  # one step on down: gate and up then get gradients too
        with torch.no_grad():
            module.experts[0].down_proj.weight.normal_(0, 0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    for module in grafts(model).values():
        for part in (module.experts[0].gate_proj, module.experts[0].up_proj, module.gate):
            assert part.weight.grad.abs().sum() > 0


def test_zero_graft_is_seeded():
    weights = {seed: [g.experts[0].gate_proj.weight.clone() for g in grafts(zero_grafted(seed)[0]).values()]
               for seed in (1, 1, 2)}
    a, b = zero_grafted(1)[0], zero_grafted(1)[0]
    for ga, gb in zip(grafts(a).values(), grafts(b).values(), strict=True):
        assert torch.equal(ga.experts[0].up_proj.weight, gb.experts[0].up_proj.weight)
    assert not torch.equal(weights[1][0], weights[2][0])
    assert not torch.equal(weights[1][0], weights[1][1])  # each layer draws its own


def test_flex_grafts_zero_when_asked():
    model = tiny_model("qwen2_moe")
    method = build_method(load_config(None, ["method=flex", "flex.graft_init=zero", "flex.graft_train=full"]))
    method.select_and_graft(model, token_batches(), seed=3)
    assert all(not g.experts[0].down_proj.weight.any() for g in grafts(model).values())


# ---- compare variants -----------------------------------------------------------------------
def test_control_variants_parse_and_validate(tmp_path):
    assert VARIANTS["flex-zero"] == ("flex", ("flex.graft_init=zero", "flex.graft_train=full"))
    assert VARIANTS["fedavg+full"] == ("fedavg", ("lora.scope=full",))
    names = parse_methods("flex,flex-zero,fedper,fedavg-ft,fedavg+full")
    runs = {run_dir.parent.name: config for run_dir, config in plan(names, [0], None, [], tmp_path)}
    assert runs["flex-zero"].flex.graft_init == "zero" and runs["flex-zero"].method == "flex"
    assert runs["fedavg+full"].lora.scope == "full" and runs["fedavg+full"].method == "fedavg"
    assert runs["fedper"].method == "fedper" and runs["fedavg-ft"].method == "fedavg-ft"
    every = plan([*VARIANTS, "fedper", "fedavg-ft"], [0], None, [], tmp_path)
    for run_dir, config in every:  # a compare report groups runs by label: each variant keeps its name
        assert run_label(config.model_dump()) == run_dir.parent.name


def test_fedavg_ft_fine_tunes_at_its_personal_lr_and_sends_the_shared_rates_weights(model_dir, tmp_path,
                                                                                     monkeypatch):
    trainings, sent = record_training(monkeypatch), record_messages(monkeypatch)
    run(model_dir, tmp_path, "method=fedavg-ft", "rounds=1", "train.personal_lr=5e-2")  # train.lr 5e-3
    clients = [r["client"] for r in metrics(tmp_path) if r["kind"] == "train"]
    assert len(clients) == 2 and len(trainings) == 4  # each client trains twice: at lr, then at personal_lr
    uplinks = [deserialize(blob)[0] for blob in sent]
    for cid, (shared, personal) in zip(clients, (trainings[0:2], trainings[2:4])):
        assert all(torch.equal(shared["start"][n], personal["start"][n]) for n in shared["start"])  # same start
        assert any(not torch.equal(shared["end"][n], personal["end"][n]) for n in shared["end"])
        state = load_file(tmp_path / "clients" / str(cid) / "state.safetensors")
        for name, value in personal["end"].items():  # kept: the personal-rate weights
            torch.testing.assert_close(state[f"fine_tuned.{name}"], value, rtol=0, atol=0)
        sent_by_client = [u for u in uplinks if set(u) == set(shared["end"])
                          and all(torch.equal(u[n], shared["end"][n]) for n in u)]
        assert sent_by_client  # sent: the shared-rate weights, never the personal-rate ones
        assert not any(all(torch.equal(u[n], personal["end"][n]) for n in u) for u in uplinks
                       if set(u) == set(personal["end"]))
