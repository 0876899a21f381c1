"""The in-process engine end to end on a tiny random qwen2_moe saved as a local model dir:
every method runs 2 rounds; FLEx sends no personal key; FedProx(mu=0) == FedAvg; the same seed
gives the same metrics; a resumed run (after a stop or a crash mid-round) ends identical."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import flexmoe.engine.local_clients as local_clients
from flexmoe.config import load_config
from flexmoe.engine.driver import sample_clients
from flexmoe.engine.simulation import InProcess, Simulation
from flexmoe.wire import serialize
from flexmoe.methods import registered

from helpers.engine import assert_same_safetensors, engine_config, metrics, run, synthetic_examples
from helpers.paths import REPO_ROOT

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(registered()))
def test_every_method_runs_two_rounds(model_dir, tmp_path, method):
    summary = run(model_dir, tmp_path, f"method={method}")
    assert summary["method"] == method and summary["rounds_completed"] == 2
    assert 0.0 <= summary["rouge_l_avg"] <= 1.0
    records = metrics(tmp_path)
    assert all("round" in r for r in records)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4 and all(r["loss"] > 0 and r["steps"] == 2 for r in train)
    evals = [r["round"] for r in records if r["kind"] == "eval"]
    assert evals == [0] * 4 + [2] * 4  # every client: the base at round 0, then after the last round
    assert 0.0 <= summary["rouge_l_avg_base"] <= 1.0
    if method == "local":
        assert summary["bytes_up"] == summary["bytes_down"] == 0
    else:
        assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    for name in ("summary.json", "report.md", "config.toml", "checkpoints/server.safetensors"):
        assert (tmp_path / name).is_file()
    assert not list(tmp_path.glob("clients/*/pending"))
    assert load_config(tmp_path / "config.toml") == engine_config(model_dir, f"method={method}")


def test_flex_sends_only_shared_lora_and_counts_exact_bytes(model_dir, tmp_path, monkeypatch):
    sent: list[bytes] = []

    def recording_serialize(tensors, metadata=None):
        blob = serialize(tensors, metadata)
        sent.append((set(tensors), blob))
        return blob

    monkeypatch.setattr(local_clients, "serialize", recording_serialize)
    summary = run(model_dir, tmp_path, "method=flex", "eval.knowledge=true", "eval.knowledge_max_docs=4", "eval.max_probes=8")
    assert sent
    for keys, _ in sent:
        assert keys and all("lora_" in k for k in keys)
        assert not any("graft" in k for k in keys)
    records = metrics(tmp_path)
    train = [r for r in records if r["kind"] == "train"]
    uploads = [len(blob) for _, blob in sent[1:3]]  # round 1 serialises: the download, then two uploads
    assert [r["bytes_up"] for r in train[:2]] == uploads
    assert all(r["bytes_down"] == len(sent[0][1]) for r in train[:2])
    evals = [r for r in records if r["kind"] == "eval" and r["round"] > 0]
    assert len(evals) == 4
    for r in evals:  # 8 experts: balanced routing has entropy ln 8
        assert r["knowledge_loss"] > 0 and 0 <= r["routing_entropy"] <= math.log(8) + 1e-9
        assert 0 <= r["expert_load_std"] <= 1
    assert summary["knowledge_loss"] == pytest.approx(sum(r["knowledge_loss"] for r in evals) / 4)
    base = next(r for r in records if r["kind"] == "server")
    assert base["round"] == 0 and base["knowledge_loss_base"] > 0 and "routing_entropy_base" in base
    for client in range(4):
        personal = tmp_path / "clients" / str(client) / "personal.safetensors"
        assert personal.is_file() and (tmp_path / "clients" / str(client) / "selection.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    ("flex.federate_routers=true",), ("flex.gate=\"none\"",), ("flex.selection=\"random\"", "flex.k=2"),
    ("flex.selection=\"frequency\"", "flex.aggregator=\"fedadam\""),
], ids=["routers", "nogate", "random-k2", "frequency-fedadam"])
def test_flex_options_run_and_keep_personal_state_home(model_dir, tmp_path, monkeypatch, options):
    sent: list[set] = []
    monkeypatch.setattr(local_clients, "serialize", lambda t, m=None: sent.append(set(t)) or serialize(t, m))
    run(model_dir, tmp_path, "method=flex", "rounds=1", *options)
    keys = set().union(*sent)
    assert not any("graft" in k for k in keys)
    routers = {k for k in keys if k.endswith("mlp.gate.weight")}
    assert bool(routers) == ("flex.federate_routers=true" in options)
    selection = json.loads((tmp_path / "clients" / "0" / "selection.json").read_text())
    assert selection["k"] == (2 if "flex.k=2" in options else 1)


def test_fedprox_with_zero_mu_equals_fedavg(model_dir, tmp_path):
    run(model_dir, tmp_path / "avg", "method=fedavg")
    run(model_dir, tmp_path / "prox0", "method=fedprox", "fedprox.mu=0.0")
    assert metrics(tmp_path / "prox0") == metrics(tmp_path / "avg")
    run(model_dir, tmp_path / "prox", "method=fedprox", "fedprox.mu=10.0")
    assert metrics(tmp_path / "prox") != metrics(tmp_path / "avg")


@pytest.mark.slow
def test_same_seed_same_metrics(model_dir, tmp_path):
    run(model_dir, tmp_path / "a")
    run(model_dir, tmp_path / "b")
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    run(model_dir, tmp_path / "c", "seed=4")
    assert (tmp_path / "a" / "metrics.jsonl").read_text() != (tmp_path / "c" / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flex", "scaffold", "fedadam", "local", "fedper"])
def test_resume_after_stop_matches_uninterrupted(model_dir, tmp_path, method):
    overrides = (f"method={method}", "rounds=3")
    run(model_dir, tmp_path / "full", *overrides)
    run(model_dir, tmp_path / "cut", *overrides, stop_after=1)
    Simulation.resume(tmp_path / "cut")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    for client in range(4):
        for name in ("state.safetensors", "personal.safetensors"):
            a, b = tmp_path / "full" / "clients" / str(client) / name, tmp_path / "cut" / "clients" / str(client) / name
            assert a.exists() == b.exists()
            if a.exists():  # compare contents: safetensors writes its metadata in hash order
                assert_same_safetensors(a, b)


def test_resume_after_crash_mid_round_matches_uninterrupted(model_dir, tmp_path, monkeypatch):
    overrides = ("method=scaffold", "rounds=3", "clients_per_round=3")
    run(model_dir, tmp_path / "full", *overrides)
    original = InProcess._train_client
    calls = {"n": 0}

    def crash_on_fifth_client(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:  # round 2, after its first client wrote a pending state
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(InProcess, "_train_client", crash_on_fifth_client)
    with pytest.raises(KeyboardInterrupt):
        run(model_dir, tmp_path / "cut", *overrides)
    assert list((tmp_path / "cut").glob("clients/*/pending"))
    monkeypatch.setattr(InProcess, "_train_client", original)
    Simulation.resume(tmp_path / "cut")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_client_sampling_is_deterministic_and_varies_by_round():
    rounds = [sample_clients(0, r, 10, 3) for r in range(1, 6)]
    assert rounds == [sample_clients(0, r, 10, 3) for r in range(1, 6)]
    assert all(len(set(c)) == 3 and all(0 <= x < 10 for x in c) for c in rounds)
    assert len({tuple(c) for c in rounds}) > 1
    assert sample_clients(0, 1, 10, 10) == list(range(10))


def test_starting_over_an_existing_run_is_refused(model_dir, tmp_path):
    from flexmoe.errors import FlexmoeError

    run(model_dir, tmp_path, "rounds=1")
    with pytest.raises(FlexmoeError, match="--resume"):
        run(model_dir, tmp_path, "rounds=1")


def test_trainable_state_is_fully_reloaded_per_client(model_dir, tmp_path):
    """A client's result must not depend on which client trained before it on the shared model."""
    run(model_dir, tmp_path / "a", "method=flex", "rounds=1")
    first = {r["client"]: r["loss"] for r in metrics(tmp_path / "a") if r["kind"] == "train"}
    torch.manual_seed(123)  # global RNG state must not leak into the run either
    run(model_dir, tmp_path / "b", "method=flex", "rounds=1", "clients_per_round=4")
    everyone = {r["client"]: r["loss"] for r in metrics(tmp_path / "b") if r["kind"] == "train"}
    assert all(everyone[c] == loss for c, loss in first.items())


@pytest.mark.slow
def test_cli_run_killed_mid_way_resumes_to_the_uninterrupted_metrics(model_dir, tmp_path):
    """A real `flexmoe run` process, SIGKILLed once round 1 is committed, then `--resume`d."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(e.__dict__) + "\n" for e in synthetic_examples()))
    settings = [f"model={model_dir}", f"data.source={data}", "rounds=3", "num_clients=4", "clients_per_round=2",
                "train.local_steps=3", "train.batch_size=4", "train.max_length=64", "lora.r=2",
                "flex.calibration_examples=4", "eval.max_test_examples=2", "eval.max_new_tokens=4",
                "eval.knowledge=false", "data.test_fraction=0.2"]
    command = [sys.executable, "-m", "flexmoe.cli", "run", "--quiet"]
    for item in settings:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    full = subprocess.run(command + ["--output-dir", str(tmp_path / "full")], check=True, env=env, capture_output=True,
                          text=True)
    # what to look at, then how long each phase took (make demo ends with these lines)
    closing = full.stdout.splitlines()[-3:]
    assert closing[0] == f"report: {tmp_path / 'full' / 'report.md'}"
    assert closing[1].startswith("what matters: personalised ROUGE-L ") and "(base " in closing[1]
    assert re.fullmatch(r"time: setup and round 0 \d+ s, training \d+ s, evaluation \d+ s, report \d+ s; "
                        r"\d+ s in all", closing[2]), closing[2]

    victim = subprocess.Popen(command + ["--output-dir", str(tmp_path / "cut")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while victim.poll() is None and time.monotonic() < deadline:
        if log.exists() and '"kind": "server", "lr"' in log.read_text():  # round 1 has committed
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    cut = metrics(tmp_path / "cut")
    assert cut[-1]["round"] < 3, "the run finished before it could be killed"
    resumed = subprocess.run([sys.executable, "-m", "flexmoe.cli", "run", "--quiet", "--resume", str(tmp_path / "cut")],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "report:" in resumed.stdout
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
