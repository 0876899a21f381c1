"""Server and client math of every method, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from flexmoe.config import load_config
from flexmoe.methods.base import LocalRun
from flexmoe.methods.build import build_method
from flexmoe.methods.rules import Reply
from flexmoe.methods.base import weighted_mean


def method(name: str, *overrides: str):
    return build_method(load_config(None, [f"method={name}", *overrides]))


def scalar(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def test_fedavg_of_identical_updates_is_identity():
    torch.manual_seed(0)
    update = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    glob = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    replies = [Reply({k: v.clone() for k, v in update.items()}, n) for n in (3, 7, 11)]
    new_global, _, _ = method("fedavg").aggregate(glob, {}, replies)
    for name in update:
        torch.testing.assert_close(new_global[name], update[name], rtol=0, atol=1e-6)


def test_fedavg_weights_by_examples_or_uniformly():
    replies = [Reply({"w": scalar(1.0)}, 1), Reply({"w": scalar(4.0)}, 3)]
    by_examples, _, _ = method("fedavg").aggregate({"w": scalar(0.0)}, {}, replies)
    uniform, _, _ = method("fedavg", 'server.weighting="uniform"').aggregate({"w": scalar(0.0)}, {}, replies)
    assert by_examples["w"].item() == pytest.approx((1 * 1.0 + 3 * 4.0) / 4)
    assert uniform["w"].item() == pytest.approx(2.5)


def test_weighted_mean_keeps_dtype():
    out = weighted_mean([{"w": torch.ones(2, dtype=torch.bfloat16)}] * 2, [1.0, 2.0])
    assert out["w"].dtype == torch.bfloat16


def test_fedprox_hooks_carry_mu_and_the_global_anchor():
    received = {"w": scalar(0.3)}
    hooks = method("fedprox", "fedprox.mu=0.5").train_hooks(received, {})
    assert hooks.proximal_mu == 0.5 and hooks.proximal_anchor is received
    assert method("fedavg").train_hooks(received, {}).proximal_mu == 0.0


def test_scaffold_control_variates_hand_checked():
    """x = 1, c = 0.2, c_i = 0.1, y_i = 0.5 after K = 2 steps at lr 0.25 (Karimireddy et al., option II)."""
    scaffold = method("scaffold", "num_clients=4", "clients_per_round=2")
    received = {"w": scalar(1.0), "control.w": scalar(0.2)}
    client_state = {"control.w": scalar(0.1)}
    hooks = scaffold.train_hooks(received, client_state)
    assert hooks.grad_correction["w"].item() == pytest.approx(0.2 - 0.1)
    message, new_state = scaffold.uplink(received, {"w": scalar(0.5)}, client_state, LocalRun(steps=2, lr=0.25,
                                                                                           num_examples=10))
    # c_i+ = c_i - c + (x - y_i) / (K lr) = 0.1 - 0.2 + 0.5 / 0.5 = 0.9
    assert new_state["control.w"].item() == pytest.approx(0.9)
    assert message["delta.w"].item() == pytest.approx(-0.5)
    assert message["control_delta.w"].item() == pytest.approx(0.8)
    assert set(message) == {"delta.w", "control_delta.w"}
    # a second client with dy = +0.1, dc = 0.4; server: x += 1.0 * mean(dy), c += 2/4 * mean(dc)
    other = Reply({"delta.w": scalar(0.1), "control_delta.w": scalar(0.4)}, 99)
    new_x, server_state, _ = scaffold.aggregate({"w": scalar(1.0)}, {"control.w": scalar(0.2)},
                                                [Reply(message, 10), other])
    assert new_x["w"].item() == pytest.approx(1.0 + (-0.5 + 0.1) / 2)
    assert server_state["control.w"].item() == pytest.approx(0.2 + 0.5 * (0.8 + 0.4) / 2)
    assert scaffold.downlink({"w": scalar(1.0)}, server_state).keys() == {"w", "control.w"}


def test_scaffold_first_round_starts_from_zero_controls():
    scaffold = method("scaffold")
    state = scaffold.init_server_state({"w": torch.ones(2, 2)})
    assert torch.equal(state["control.w"], torch.zeros(2, 2))
    hooks = scaffold.train_hooks(scaffold.downlink({"w": torch.ones(2, 2)}, state), {})
    assert torch.equal(hooks.grad_correction["w"], torch.zeros(2, 2))


# Reddi et al. 2021 defaults in our config: beta1 = 0.9, beta2 = 0.99, eta = 1e-2, tau = 1e-3.
B1, B2, ETA, TAU = 0.9, 0.99, 1e-2, 1e-3


def two_server_steps(name: str, *overrides: str) -> tuple[float, float]:
    """x0 = 1; round 1 clients average 1.5 (delta 0.5); round 2 they average x1 - 0.2 (delta -0.2)."""
    opt = method(name, *overrides)
    glob = {"w": scalar(1.0)}
    state = opt.init_server_state(glob)
    x1, state, _ = opt.aggregate(glob, state, [Reply({"w": scalar(1.4)}, 1), Reply({"w": scalar(1.6)}, 1)])
    x2, state, _ = opt.aggregate(x1, state, [Reply({"w": x1["w"] - 0.2}, 5)])
    return x1["w"].item(), x2["w"].item()


def test_fedadam_matches_hand_computed_steps():
    m1 = (1 - B1) * 0.5
    v1 = B2 * TAU**2 + (1 - B2) * 0.25
    x1 = 1.0 + ETA * m1 / (math.sqrt(v1) + TAU)
    m2 = B1 * m1 + (1 - B1) * -0.2
    v2 = B2 * v1 + (1 - B2) * 0.04
    x2 = x1 + ETA * m2 / (math.sqrt(v2) + TAU)
    assert two_server_steps("fedadam") == pytest.approx((x1, x2), rel=1e-5)


def test_fedyogi_matches_hand_computed_steps():
    m1 = (1 - B1) * 0.5
    v1 = TAU**2 + (1 - B2) * 0.25  # sign(v0 - 0.25) = -1
    x1 = 1.0 + ETA * m1 / (math.sqrt(v1) + TAU)
    m2 = B1 * m1 + (1 - B1) * -0.2
    v2 = v1 + (1 - B2) * 0.04  # v1 = 0.0025 < 0.04: sign -1 again, v grows
    x2 = x1 + ETA * m2 / (math.sqrt(v2) + TAU)
    assert two_server_steps("fedyogi") == pytest.approx((x1, x2), rel=1e-5)


def test_fedyogi_shrinks_v_when_it_exceeds_the_squared_delta():
    yogi = method("fedyogi")
    m, v, _ = yogi.rule.step(torch.tensor([0.1]), torch.tensor([0.0]), torch.tensor([0.5]))
    assert v.item() == pytest.approx(0.5 - (1 - B2) * 0.01)


def test_fedadagrad_matches_hand_computed_steps():
    m1 = (1 - B1) * 0.5
    v1 = TAU**2 + 0.25
    x1 = 1.0 + ETA * m1 / (math.sqrt(v1) + TAU)
    m2 = B1 * m1 + (1 - B1) * -0.2
    v2 = v1 + 0.04
    x2 = x1 + ETA * m2 / (math.sqrt(v2) + TAU)
    assert two_server_steps("fedadagrad") == pytest.approx((x1, x2), rel=1e-5)


def test_fedavgm_matches_hand_computed_steps():
    # defaults eta = 0.1, beta = 0.9: m1 = 0.5, x1 = 1 + 0.1 * 0.5 = 1.05; m2 = 0.9 * 0.5 - 0.2 = 0.25, x2 = 1.075
    assert two_server_steps("fedavgm") == pytest.approx((1.05, 1.075), rel=1e-6)
    # eta = 1: x1 = 1.5, x2 = 1.5 + 0.25 = 1.75
    assert two_server_steps("fedavgm", "server.momentum_lr=1.0") == pytest.approx((1.5, 1.75), rel=1e-6)


def test_fedavgm_default_keeps_fedavg_long_run_step():
    """eta = 1 - beta: a constant update u reaches a server step of u, as FedAvg's (geometric series)."""
    opt = method("fedavgm")
    glob = {"w": scalar(0.0)}
    state = opt.init_server_state(glob)
    for _ in range(200):
        new, state, _ = opt.aggregate(glob, state, [Reply({"w": glob["w"] + 0.5}, 1)])
        step, glob = new["w"].item() - glob["w"].item(), new
    assert step == pytest.approx(0.5, rel=1e-6)


def test_fedavgm_without_momentum_is_fedavg():
    assert two_server_steps("fedavgm", "server.momentum=0.0", "server.momentum_lr=1.0") == pytest.approx(
        (1.5, 1.3), rel=1e-6)


def test_local_never_communicates_and_keeps_its_weights():
    local = method("local")
    assert local.downlink({"w": scalar(1.0)}, {}) == {}
    message, state = local.uplink({}, {"w": scalar(2.0)}, {}, LocalRun(1, 0.1, 4))
    assert message == {}
    assert local.start_weights({}, state, {"w": scalar(0.0)})["w"].item() == 2.0
    assert local.start_weights({}, {}, {"w": scalar(0.0)})["w"].item() == 0.0
    assert local.eval_weights({"w": scalar(9.0)}, state)["w"].item() == 2.0


def test_flex_aggregates_with_the_configured_server_optimizer():
    flex = method("flex", 'flex.aggregator="fedavgm"', "server.momentum_lr=1.0")
    assert two_server_steps("fedavgm", "server.momentum_lr=1.0") == pytest.approx((1.5, 1.75))
    glob = {"w": scalar(1.0)}
    state = flex.init_server_state(glob)
    x1, _, _ = flex.aggregate(glob, state, [Reply({"w": scalar(1.5)}, 1)])
    assert x1["w"].item() == pytest.approx(1.5)
    assert flex.scope == "attention"
