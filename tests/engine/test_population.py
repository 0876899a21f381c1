"""A population larger than a round: only the round's (and the evaluated) clients are tokenised and
kept, only they write state, and a client grafted before its first round has exactly the graft it
would have had at round 0 (the tiny random qwen2_moe and synthetic data of test_engine)."""

from __future__ import annotations

import pytest
import torch

import flexmoe.clients as clients_module
from flexmoe.engine.driver import evaluated_clients, sample_clients
from flexmoe.files import load_checked

from helpers.engine import engine_config, metrics, run

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


POPULATION = ("num_clients=8", "clients_per_round=2", "rounds=3", "eval.every=0")


def test_evaluated_clients_are_a_fixed_seeded_sample(model_dir):
    config = engine_config(model_dir, *POPULATION, "eval.clients=3")
    chosen = evaluated_clients(config)
    assert len(chosen) == 3 == len(set(chosen)) and chosen == sorted(chosen) and all(0 <= c < 8 for c in chosen)
    assert chosen == evaluated_clients(config)
    assert evaluated_clients(engine_config(model_dir, *POPULATION)) == list(range(8))  # 0: every client
    assert evaluated_clients(engine_config(model_dir, *POPULATION, "eval.clients=20")) == list(range(8))


def test_only_sampled_and_evaluated_clients_are_tokenised_and_kept(model_dir, tmp_path, monkeypatch):
    tokenised: list[int] = []
    kept_sizes: list[int] = []
    original_make, original_start = clients_module.make_client, clients_module.ClientPool.start_round

    def counting_make(config, part, tokenizer):
        tokenised.append(part.client_id)
        return original_make(config, part, tokenizer)

    def recording_start(self, client_ids):
        original_start(self, client_ids)
        kept_sizes.append(len(self._kept))

    monkeypatch.setattr(clients_module, "make_client", counting_make)
    monkeypatch.setattr(clients_module.ClientPool, "start_round", recording_start)
    run(model_dir, tmp_path, *POPULATION, "eval.clients=2")
    config = engine_config(model_dir, *POPULATION, "eval.clients=2")
    evaluated = set(evaluated_clients(config))
    sampled = [set(sample_clients(config.seed, r, 8, 2)) for r in (1, 2, 3)]
    # the evaluated ones once (pinned); every other client when a round samples it and the previous did not
    expected = sorted([*evaluated, *(c for r, s in enumerate(sampled) for c in s - evaluated
                                     if r == 0 or c not in sampled[r - 1])])
    assert sorted(tokenised) == expected
    assert max(kept_sizes) <= len(evaluated) + 2
    touched = evaluated | set().union(*sampled)
    assert {int(p.name) for p in (tmp_path / "clients").iterdir()} == touched
    assert {r["client"] for r in metrics(tmp_path) if r["kind"] == "eval"} == evaluated


def test_grafting_before_the_first_round_equals_grafting_at_round_zero(model_dir, tmp_path):
    """eval.clients = 0 grafts all 8 clients at round 0; eval.clients = 2 grafts the others before
    their first round: the same selections, the same trained states, the same global model."""
    run(model_dir, tmp_path / "eager", *POPULATION)
    run(model_dir, tmp_path / "lazy", *POPULATION, "eval.clients=2")
    lazy_clients = sorted(int(p.name) for p in (tmp_path / "lazy" / "clients").iterdir())
    assert len(lazy_clients) < 8
    for cid in lazy_clients:
        for name in ("personal.safetensors", "state.safetensors", "selection.json"):
            eager, lazy = tmp_path / "eager" / "clients" / str(cid) / name, tmp_path / "lazy" / "clients" / str(cid) / name
            assert eager.exists() == lazy.exists(), (cid, name)  # state: only a client that trained
            if not lazy.exists():
                continue
            if name.endswith(".json"):
                assert lazy.read_text() == eager.read_text()
                continue
            a, b = load_checked(eager)[0], load_checked(lazy)[0]
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), (cid, name)
    eager_global = load_checked(tmp_path / "eager" / "checkpoints" / "server.safetensors")[0]
    lazy_global = load_checked(tmp_path / "lazy" / "checkpoints" / "server.safetensors")[0]
    assert all(torch.equal(eager_global[k], lazy_global[k]) for k in eager_global)
    losses = lambda d: [(r["round"], r["client"], r["loss"]) for r in metrics(d) if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "eager") == losses(tmp_path / "lazy")


def test_a_round_commits_only_its_own_clients(model_dir, tmp_path, monkeypatch):
    from flexmoe.rundir import ClientStore

    committed: list[int | None] = []
    original = ClientStore.commit

    def recording(self, completed_round, client_id=None):
        committed.append(client_id)
        return original(self, completed_round, client_id)

    monkeypatch.setattr(ClientStore, "commit", recording)
    run(model_dir, tmp_path, *POPULATION, "eval.clients=2")
    assert None not in committed and len(committed) == 3 * 2  # no walk over the population's directories
