"""FC-MoE: the projection, importance weights and retention against hand-computed values; the
per-expert layout against PEFT's own delta weights; 2-round runs of fcmoe and flex+fcmoe."""

from __future__ import annotations

import json

import pytest
import torch

import flexmoe.engine.local_clients as local_clients
import flexmoe.engine.simulation as simulation
from flexmoe.config import load_config
from flexmoe.wire import serialize
from flexmoe.methods.base import LocalRun
from flexmoe.methods.build import build_method
from flexmoe.methods.rules import Reply
from flexmoe.methods.conflict import (
    client_cosines, conflict_aware_step, consensus_cosines, importance_weights, project_conflicts,
)
from flexmoe.methods.fcmoe.method import ACTIVATION, CONSENSUS, ROUND, UPDATE, UPDATE_ROUND
from flexmoe.methods.groups import build_groups, from_expert_rows, group_matrix, split_matrix, to_expert_rows

from helpers.engine import engine_config

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


EXPERT_A = "m.layers.0.mlp.experts.lora_A.default.weight"
EXPERT_B = "m.layers.0.mlp.experts.lora_B.default.weight"
ATTN_A = "m.layers.0.self_attn.q_proj.lora_A.default.weight"
ATTN_B = "m.layers.0.self_attn.q_proj.lora_B.default.weight"


# ---- the rule on hand-computed vectors --------------------------------------------------------
def test_conflicting_update_ends_orthogonal_and_agreeing_one_is_untouched():
    direction = torch.tensor([[2.0, 0.0]])  # consensus d of one group
    updates = torch.tensor([[[-1.0, 1.0]], [[3.0, 4.0]]])  # client 0 conflicts (dot -2), client 1 agrees
    projected, removed, conflicting = project_conflicts(updates, direction)
    # Δ - (Δ·d / ‖d‖²) d = (-1, 1) - (-2/4)(2, 0) = (0, 1)
    assert torch.equal(projected[0, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(removed[0, 0], torch.tensor([-1.0, 0.0]))
    assert float(projected[0, 0] @ direction[0]) == 0.0
    assert torch.equal(projected[1], updates[1]) and torch.equal(removed[1], torch.zeros(1, 2))
    assert conflicting.tolist() == [[True], [False]]


def test_cosines_equal_the_pairwise_brute_force():
    updates = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    updates[1, 1] = 0  # a client that left expert 1 unchanged: no cosine for it
    direction = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    cos = torch.nn.functional.cosine_similarity
    expected = [cos(updates[n, k], direction[k], dim=0) for n in range(3) for k in range(2) if (n, k) != (1, 1)]
    assert consensus_cosines(updates, direction).tolist() == pytest.approx([float(c) for c in expected], abs=1e-6)
    pairs = [cos(updates[i, k], updates[j, k], dim=0) for k in range(2) for i in range(3) for j in range(i + 1, 3)
             if k == 0 or 1 not in (i, j)]
    assert client_cosines(updates).tolist() == pytest.approx([float(c) for c in pairs], abs=1e-6)


def test_consensus_uses_the_importance_weights_and_projection_is_per_expert():
    updates = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],    # client 0: experts 0 and 1
                            [[-3.0, 1.0], [0.0, 2.0]]])  # client 1
    weights = torch.tensor([[0.75, 0.5], [0.25, 0.5]])
    step, direction, conflicting = conflict_aware_step(updates, weights)
    # expert 0: d = .75(1,0) + .25(-3,1) = (0, .25); client 0 dot 0 (no conflict), client 1 dot .25
    assert torch.allclose(direction, torch.tensor([[0.0, 0.25], [0.0, 1.5]]))
    assert not conflicting.any()
    assert torch.allclose(step, direction)
    # flip client 1's expert 1 against the consensus: d1 = .5(0,1) + .5(1,-2) = (.5,-.5); client 0 dot -.5
    updates[1, 1] = torch.tensor([1.0, -2.0])
    step, direction, conflicting = conflict_aware_step(updates, weights)
    assert conflicting.tolist() == [[False, True], [False, False]]
    # client 0's expert 1: (0,1) - (-.5/.5)(.5,-.5) = (.5,.5); step = .5(.5,.5) + .5(1,-2) = (.75,-.75)
    assert torch.allclose(step[1], torch.tensor([0.75, -0.75]))
    assert torch.allclose(step[0], torch.tensor([0.0, 0.25]))  # expert 0 unaffected


def test_importance_weights_sum_to_one_per_expert_and_follow_the_product():
    frequency = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.9, 0.0]])
    norms = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    sizes = torch.tensor([10.0, 30.0])
    weights = importance_weights(frequency, norms, sizes)
    assert torch.allclose(weights.sum(dim=0), torch.ones(3))
    # expert 0: raw 0.5*2*10 = 10 and 0.1*1*30 = 3 -> 10/13, 3/13
    assert torch.allclose(weights[:, 0], torch.tensor([10 / 13, 3 / 13]))
    assert torch.allclose(weights[:, 2], torch.tensor([0.25, 0.75]))  # nobody used expert 2: by data size
    only_size = importance_weights(frequency, norms, sizes, frequency_power=0, norm_power=0)
    assert torch.allclose(only_size, torch.tensor([[0.25] * 3, [0.75] * 3]))


# ---- per-expert layout of PEFT's LoRA on fused experts ------------------------------------------
def test_expert_rows_match_peft_delta_weight_per_expert():
    from helpers.tiny import tiny_model
    from flexmoe.models import add_lora

    model = add_lora(tiny_model("qwen2_moe"), scope="attention+experts", r=2)
    wrapper = model.base_model.model.model.layers[0].mlp.experts  # ParamWrapper(down_proj)
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    with torch.no_grad():
        b.normal_()
    experts = wrapper.num_experts
    before = wrapper.get_delta_weight("default").detach().clone()
    rows_a, rows_b = to_expert_rows("x.lora_A.default.weight", a.detach(), experts), \
        to_expert_rows("x.lora_B.default.weight", b.detach(), experts)
    with torch.no_grad():  # change only expert 3's pieces of A and B
        rows_a[3] += 1.0
        rows_b[3] += 1.0
        a.copy_(from_expert_rows("x.lora_A.default.weight", rows_a, tuple(a.shape)))
        b.copy_(from_expert_rows("x.lora_B.default.weight", rows_b, tuple(b.shape)))
    after = wrapper.get_delta_weight("default").detach()
    changed = [e for e in range(experts) if not torch.equal(before[e], after[e])]
    assert changed == [3]


def test_groups_split_and_rebuild_exactly():
    shapes = {EXPERT_A: (8, 5), EXPERT_B: (3, 8), ATTN_A: (2, 5), ATTN_B: (6, 2), "m.layers.0.mlp.gate.weight": (4, 5)}
    tensors = {n: torch.randn(s) for n, s in shapes.items()}
    groups = build_groups(shapes, rank=2)
    assert [(g.key, g.rows) for g in groups] == [
        ("m.layers.0.mlp", 4), ("m.layers.0.mlp.gate", 1), ("m.layers.0.self_attn.q_proj", 1)]
    assert len(build_groups(shapes, rank=2, by="tensor")) == 4
    for group in groups:
        matrix = group_matrix(tensors, group)
        assert matrix.shape[0] == group.rows
        rebuilt = split_matrix(matrix, group, tensors)
        assert all(torch.equal(rebuilt[n], tensors[n]) for n in group.names)


# ---- the method: FedAvg equivalence and retention ---------------------------------------------
def small_config(*overrides: str):
    return load_config(None, ["method=fcmoe", "lora.r=2", *overrides])


def reply(weights: dict, counts: torch.Tensor, examples: int) -> Reply:
    return Reply({**weights, ACTIVATION + "m.layers.0.mlp": counts}, examples)


def random_weights(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shapes = {EXPERT_A: (8, 5), EXPERT_B: (3, 8), ATTN_A: (2, 5), ATTN_B: (6, 2)}
    return {n: torch.randn(s, generator=generator) for n, s in shapes.items()}


def test_without_conflicts_and_retention_the_rule_is_importance_weighted_fedavg():
    method = build_method(small_config("fcmoe.retention=0"))
    start = random_weights(0)
    step = random_weights(1)
    scales = [1.0, 2.0, 0.5]  # updates along one direction per group: no conflicts possible
    counts = [torch.tensor([5.0, 1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 3.0, 1.0, 0.0])]
    examples = [10, 20, 40]
    replies = [reply({n: start[n] + s * step[n] for n in start}, c, e) for s, c, e in zip(scales, counts, examples)]
    new, state, metrics = method.aggregate(start, method.init_server_state(start), replies)
    assert metrics["fcmoe_conflict_fraction"] == 0.0 and not any(k.startswith(CONSENSUS) for k in state)
    group = next(g for g in method.groups(start) if g.rows > 1)
    updates = torch.stack([group_matrix(r.tensors, group) - group_matrix(start, group) for r in replies])
    frequency = torch.stack([c / c.sum() for c in counts])
    c = importance_weights(frequency, updates.norm(dim=-1), torch.tensor(examples, dtype=torch.float32))
    expected = group_matrix(start, group) + (c[..., None] * updates).sum(0)  # brute-force weighted mean
    assert torch.allclose(group_matrix(new, group), expected, atol=1e-6)
    # the attention group: c_i ∝ ‖Δ_i‖ n_i = s_i ‖step‖ n_i
    raw = torch.tensor([s * e for s, e in zip(scales, examples)])
    mean_scale = float((raw / raw.sum() * torch.tensor(scales)).sum())
    for name in (ATTN_A, ATTN_B):
        assert torch.allclose(new[name], start[name] + mean_scale * step[name], atol=1e-6)


def test_retained_component_readded_is_exactly_lambda_times_the_removed_one():
    method = build_method(small_config("fcmoe.retention=0.5", "fcmoe.norm_power=0", "fcmoe.frequency_power=0"))
    start = random_weights(0)
    step = random_weights(1)
    counts = torch.ones(4)
    received = method.downlink(start, method.init_server_state(start))
    trained = [{n: start[n] + step[n] for n in start}, {n: start[n] - 0.2 * step[n] for n in start}]
    states, replies = [], []
    for weights, examples in zip(trained, [30, 10]):  # consensus = step * (.75 - .05): client 1 conflicts
        message, state = method.uplink(received, weights, {}, LocalRun(steps=1, lr=1.0, num_examples=examples))
        assert set(message) == set(weights) and set(state) == {UPDATE_ROUND, *(UPDATE + n for n in weights)}
        states.append(state)
        replies.append(Reply({**message, ACTIVATION + "m.layers.0.mlp": counts}, examples))
    new, server_state, metrics = method.aggregate(start, method.init_server_state(start), replies)
    assert metrics["fcmoe_conflict_fraction"] == 0.5  # client 1 in both groups, client 0 in none
    after = method.downlink(new, server_state)
    assert int(after[ROUND]) == 1 and int(states[1][UPDATE_ROUND]) == 1
    # client 1's update -0.2 step is fully anti-parallel to the consensus: projection removes it all
    removed = method.retained(after, states[1])
    for name in start:
        assert torch.allclose(removed[name], -0.2 * step[name], atol=1e-6)
    start_1 = method.start_weights(after, states[1], start)
    assert all(torch.allclose(start_1[n], new[n] + 0.5 * removed[n]) for n in start)
    assert method.retained(after, states[0]) == {} or all(
        torch.count_nonzero(t) == 0 for t in method.retained(after, states[0]).values())
    assert all(torch.equal(method.start_weights(after, states[0], start)[n], new[n]) for n in start)
    assert method.eval_weights(after, states[1]).keys() == start.keys()
    # a client whose update entered an older aggregation re-adds nothing
    stale = {**states[1], UPDATE_ROUND: torch.zeros(1, dtype=torch.int64)}
    assert method.retained(after, stale) == {}


def test_without_the_projection_conflicting_updates_are_averaged_as_they_are_and_nothing_is_retained():
    method = build_method(small_config("fcmoe.project=false", "fcmoe.retention=0.5", "fcmoe.norm_power=0",
                                       "fcmoe.frequency_power=0"))
    start, step = random_weights(0), random_weights(1)
    # client 1's update is anti-parallel to the consensus (as in the retention test above)
    replies = [reply({n: start[n] + s * step[n] for n in start}, torch.ones(4), e) for s, e in ((1.0, 30), (-0.2, 10))]
    new, state, metrics = method.aggregate(start, method.init_server_state(start), replies)
    assert metrics["fcmoe_conflict_fraction"] == 0.5  # still measured
    for name in start:  # c = (.75, .25) by examples alone: the plain weighted mean, no projection
        assert torch.allclose(new[name], start[name] + (0.75 - 0.05) * step[name], atol=1e-6)
    assert not any(k.startswith(CONSENSUS) for k in state) and method.retention == 0.0
    received = method.downlink(new, state)
    assert set(received) == set(new)  # no consensus downlink: nothing was removed, so nothing to re-add
    projected = build_method(small_config("fcmoe.retention=0.5", "fcmoe.norm_power=0", "fcmoe.frequency_power=0"))
    with_projection, _, _ = projected.aggregate(start, projected.init_server_state(start), replies)
    assert not torch.allclose(with_projection[ATTN_A], new[ATTN_A])  # the switch changes the step


# ---- end to end -------------------------------------------------------------------------------
def run_recording(model_dir, tmp_path, monkeypatch, method: str) -> tuple[dict, list[set]]:
    sent: list[set] = []

    def recording_serialize(tensors, metadata=None):
        sent.append(set(tensors))
        return serialize(tensors, metadata)

    monkeypatch.setattr(local_clients, "serialize", recording_serialize)
    config = engine_config(model_dir, f'method="{method}"', "clients_per_round=4")
    summary = simulation.Simulation(config, tmp_path).run()
    return summary, sent


@pytest.mark.slow
def test_fcmoe_runs_two_rounds_with_experts_and_retention(model_dir, tmp_path, monkeypatch):
    summary, sent = run_recording(model_dir, tmp_path, monkeypatch, "fcmoe")
    assert summary["rounds_completed"] == 2 and 0.0 <= summary["rouge_l_avg"] <= 1.0
    uplinks = [keys for keys in sent if any(k.startswith(ACTIVATION) for k in keys)]
    assert len(uplinks) == 8  # 4 clients x 2 rounds, each with its activation counts
    assert all(any(".experts." in k and "lora_" in k for k in keys) for keys in uplinks)
    assert not any("graft" in k for keys in sent for k in keys)
    downlinks = [keys for keys in sent if ROUND in keys]
    servers = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["fcmoe_conflict_fraction"] for r in servers if r["kind"] == "server" and r["round"] > 0]
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions)
    # the consensus travels only where round 1 had a conflict
    assert len(downlinks) == 2 and any(k.startswith(CONSENSUS) for k in downlinks[1]) == (fractions[0] > 0)


@pytest.mark.slow
def test_flex_fcmoe_runs_two_rounds_and_keeps_grafts_home(model_dir, tmp_path, monkeypatch):
    summary, sent = run_recording(model_dir, tmp_path, monkeypatch, "flex+fcmoe")
    assert summary["method"] == "flex+fcmoe" and summary["rounds_completed"] == 2
    uplinks = [keys for keys in sent if ROUND not in keys]
    assert len(uplinks) == 8
    for keys in uplinks:
        assert keys and not any("graft" in k for k in keys)
        assert all("self_attn" in k and "lora_" in k for k in keys)  # attention LoRA only, no counts
    assert list(tmp_path.glob("clients/*/personal.safetensors"))


def test_activation_counts_cover_the_training_forwards_without_padding():
    from helpers.tiny import tiny_model
    from flexmoe.models.routing import ExpertCounts

    model = build_method(small_config()).prepare_model(tiny_model("qwen2_moe"))
    input_ids = torch.randint(3, 90, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with ExpertCounts(model, {"base_model.model.model.layers.0.mlp", "base_model.model.model.layers.1.mlp"}) as counter:
        model(input_ids=input_ids, attention_mask=mask)
        model(input_ids=input_ids[:1], attention_mask=mask[:1])
    counts = counter.counts
    model(input_ids=input_ids, attention_mask=mask)  # after close: not counted
    assert counts == counter.counts
    assert sorted(counts) == ["base_model.model.model.layers.0.mlp", "base_model.model.model.layers.1.mlp"]
    top_k = model.config.num_experts_per_tok
    assert all(c.shape == (8,) and int(c.sum()) == top_k * (11 + 7) for c in counts.values())


@pytest.mark.slow
def test_fcmoe_personalised_model_readds_the_retained_component(model_dir, tmp_path, monkeypatch):
    """Client 0 turns its update around (and triples it), so the round has conflicts; every
    client's restored model is the global one plus λ times exactly its removed component."""
    from flexmoe.engine.restore import restore
    from flexmoe.rundir import ClientStore, load_server
    from flexmoe.methods.fcmoe.method import Fcmoe
    from flexmoe.models import shared_state

    honest_uplink, calls = Fcmoe.uplink, []

    def contrary_first_client(self, received, trained, client_state, run):
        if not calls:
            trained = {n: received[n] - 3 * (t - received[n]) for n, t in trained.items()}
        calls.append(run)
        return honest_uplink(self, received, trained, client_state, run)

    monkeypatch.setattr(Fcmoe, "uplink", contrary_first_client)
    config = engine_config(model_dir, "method=fcmoe", "clients_per_round=4", "rounds=1", "fcmoe.retention=0.5")
    simulation.Simulation(config, tmp_path).run()
    server = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert server["kind"] == "server" and server["fcmoe_conflict_fraction"] > 0
    _, global_weights, server_state = load_server(tmp_path)
    method = build_method(config)
    received = method.eval_received(global_weights, server_state)
    store = ClientStore(tmp_path / "clients")
    norms = []
    for client in range(4):
        retained = method.retained(received, store.load_state(client).method)
        assert retained and retained.keys() <= global_weights.keys()  # groups with a conflict
        norms.append(sum(float(t.norm()) for t in retained.values()))
        restored = shared_state(restore(tmp_path, client).model, method.roles)
        for name, weight in global_weights.items():
            expected = weight + 0.5 * retained[name] if name in retained else weight
            assert torch.allclose(restored[name], expected, atol=1e-6)
    assert max(norms) > 0


@pytest.mark.slow
def test_fcmoe_resumed_run_matches_uninterrupted(model_dir, tmp_path):
    """Round 2 depends on round 1's consensus (server checkpoint) and each client's stored update."""
    from helpers.engine import assert_same_safetensors, metrics

    def run(out, stop_after=None):
        config = engine_config(model_dir, "method=fcmoe", "clients_per_round=4", "rounds=2")
        return simulation.Simulation(config, out).run(stop_after=stop_after)

    run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=1)
    simulation.Simulation.resume(tmp_path / "cut")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    for client in range(4):
        assert_same_safetensors(*(tmp_path / run_dir / "clients" / str(client) / "state.safetensors"
                                  for run_dir in ("full", "cut")))


def test_flex_fcmoe_refuses_another_aggregator():
    from flexmoe.errors import FlexmoeError

    with pytest.raises(FlexmoeError, match="flex.aggregator"):
        build_method(load_config(None, ['method="flex+fcmoe"', "flex.aggregator=fedadam"]))


@pytest.mark.parametrize("scope", ["experts", "attention+experts", "full"])
def test_scopes_share_the_experts_and_group_them_per_expert(scope):
    from helpers.tiny import tiny_model
    from flexmoe.models import split_parameters

    method = build_method(small_config(f'fcmoe.scope="{scope}"'))
    model = method.prepare_model(tiny_model("qwen2_moe"))
    shared = {n: p.detach() for n, p in split_parameters(model, method.roles).shared.items()}
    attention = [n for n in shared if "self_attn" in n]
    assert (not attention) == (scope == "experts")
    expert_groups = [g for g in method.groups(shared) if g.experts]
    assert len(expert_groups) == 2 and all(g.rows == 8 for g in expert_groups)
    for group in method.groups(shared):
        rebuilt = split_matrix(group_matrix(shared, group), group, shared)
        assert all(torch.equal(rebuilt[n], shared[n]) for n in group.names)
    if scope == "full":  # expert e's piece of a fused tensor is its slice e
        fused = next(n for n in expert_groups[0].names if n.endswith("experts.down_proj"))
        rows = to_expert_rows(fused, shared[fused], 8)
        assert torch.equal(rows[5], shared[fused][5].reshape(-1))
