"""The attack harness (`[faults]`): each attack's hand values, its place in the uplink (after honest
local training, relative to what the client received), and a robust rule that keeps the attacker out."""

from __future__ import annotations

import pytest
import torch

from flexmoe.config import load_config
from flexmoe.engine import local_clients
from flexmoe.engine.faults import attacked_update
from flexmoe.errors import FlexmoeError
from flexmoe.methods.build import build_method
from flexmoe.wire import deserialize, serialize

from helpers.engine import metrics, run

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


UPDATE = {"a": torch.tensor([3.0, -4.0]), "b": torch.tensor([[0.0]])}  # RMS = sqrt(25 / 3)


@pytest.mark.parametrize("attack,expected", [
    ("sign-flip", {"a": [-3.0, 4.0], "b": [[0.0]]}),
    ("scale:10", {"a": [30.0, -40.0], "b": [[0.0]]}),
    ("scale:-0.5", {"a": [-1.5, 2.0], "b": [[-0.0]]}),
    ("same-value", {"a": [(25 / 3) ** 0.5] * 2, "b": [[(25 / 3) ** 0.5]]}),
    ("same-value:7", {"a": [7.0, 7.0], "b": [[7.0]]}),
])
def test_attacks_hand_values(attack, expected):
    out = attacked_update(attack, UPDATE, seed=0)
    assert out.keys() == expected.keys()
    for name, values in expected.items():
        assert out[name].flatten().tolist() == pytest.approx(torch.tensor(values).flatten().tolist())


def test_noise_attack_is_seeded_and_has_its_sigma():
    big = {"w": torch.zeros(200_000)}
    noisy = attacked_update("noise:0.5", big, seed=11)["w"]
    assert float(noisy.std()) == pytest.approx(0.5, rel=0.01) and abs(float(noisy.mean())) < 0.01
    assert torch.equal(noisy, attacked_update("noise:0.5", big, seed=11)["w"])
    assert not torch.equal(noisy, attacked_update("noise:0.5", big, seed=12)["w"])


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_with_update_inverts_reply_update(name):
    method = build_method(load_config(None, [f"method={name}"]))
    glob = {"w": torch.tensor([1.0, 2.0])}
    reply = {"w": torch.tensor([1.5, 1.0])} if name == "fedavg" else \
        {"delta.w": torch.tensor([0.5, -1.0]), "control_delta.w": torch.tensor([0.1, 0.2])}
    update = method.reply_update(reply, glob)
    assert update["w"].tolist() == [0.5, -1.0]
    rebuilt = method.with_update(reply, glob, {"w": 2 * update["w"]})
    assert method.reply_update(rebuilt, glob)["w"].tolist() == [1.0, -2.0]
    assert rebuilt.keys() == reply.keys()


@pytest.mark.parametrize("overrides,words", [
    (["faults.attack=flip"], "sign-flip, scale"),
    (["faults.attack=noise:0"], "> 0"),
    (["faults.attack=scale:inf"], "finite"),
    (["faults.malicious_clients=[4]"], "outside 0..3"),
    (["faults.malicious_clients=[1, 1]"], "distinct"),
])
def test_bad_fault_settings_are_one_line(overrides, words):
    with pytest.raises(FlexmoeError, match=words) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


def test_the_flower_engine_refuses_the_harness():
    from flexmoe.engine.flower.server_app import refuse_in_flower

    refuse_in_flower(load_config(None, []))
    with pytest.raises(FlexmoeError, match="in-process research tool"):
        refuse_in_flower(load_config(None, ["faults.malicious_clients=[0]"]))


def uploads(monkeypatch, model_dir, out, *overrides) -> tuple[list[dict], list[dict]]:
    """(every message the run sent, decoded, in order; its metrics records)."""
    sent = []
    monkeypatch.setattr(local_clients, "serialize", lambda t, m=None: sent.append(t) or serialize(t, m))
    run(model_dir, out, "method=fedavg", "rounds=1", "clients_per_round=4", *overrides)
    return [deserialize(serialize(t))[0] for t in sent], metrics(out)


@pytest.mark.slow
def test_an_attacker_sends_the_scaled_honest_update_and_krum_leaves_it_out(model_dir, tmp_path, monkeypatch):
    honest, clean = uploads(monkeypatch, model_dir, tmp_path / "clean", "server.robust=krum")
    hostile, records = uploads(monkeypatch, model_dir, tmp_path / "attacked", "server.robust=krum",
                               "faults.malicious_clients=[1]", "faults.attack=scale:10")
    down, up = honest[0], honest[1:5]  # round 1: the downlink, then the four clients' uploads in order
    assert torch.equal(hostile[0][next(iter(down))], down[next(iter(down))])
    for client in (0, 2, 3):  # honest clients are untouched
        assert all(torch.equal(hostile[1 + client][n], t) for n, t in up[client].items())
    for name, trained in up[1].items():  # received + 10 * (honest trained - received)
        torch.testing.assert_close(hostile[2][name], down[name] + 10 * (trained - down[name]), rtol=1e-5, atol=1e-6)
    train = {r["client"]: r for r in records if r["kind"] == "train"}
    assert train[1]["attack"] == "scale:10" and "attack" not in train[0]
    server = [r for r in records if r["kind"] == "server" and r["round"] == 1][0]
    assert 1 not in server["krum_kept"] and len(server["krum_kept"]) == 3
    clean_server = [r for r in clean if r["kind"] == "server" and r["round"] == 1][0]
    assert server["update_norms"]["1"] == pytest.approx(10 * clean_server["update_norms"]["1"], rel=1e-5)
