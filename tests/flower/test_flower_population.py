"""A Flower simulation of 100 SuperNodes (`flwr run . local`, `num-supernodes=100`): FLEx on a tiny
random model, 2 clients sampled per round, 2 of them evaluated (`eval.clients`). Every node is asked
in round 0 which client it is; only the evaluated ones evaluate the base and graft then, a sampled
one grafts before its first round, as in process. The run must reproduce the in-process engine's
metrics and per-example files exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.flower import BIN, ROOT, flower_env, free_base_port, processes_mentioning, read_metrics, stop, without_bytes

pytestmark = [pytest.mark.flower, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flwr", path=str(BIN)) is None, reason="flwr is not installed")]
NODES = 100

RUN_CONFIG = """\
model = "{model}"
rounds = 1
num_clients = {nodes}
clients_per_round = 2
seed = 5
[data]
source = "{data}"
partition = "iid"
test_fraction = 0.25
[train]
local_steps = 1
batch_size = 2
max_length = 32
[lora]
r = 2
[flex]
calibration_examples = 2
[eval]
clients = 2
max_test_examples = 1
max_new_tokens = 2
knowledge_max_docs = 2
knowledge_max_length = 16
probes = false
"""


def population_examples(per_domain: int):
    """Enough distinct examples for 100 clients: the engine tests' word pattern, `per_domain` per domain."""
    from flexmoe.data import Example
    from helpers.engine import DOMAINS

    return [Example(instruction=f"describe the word {words[i % len(words)]}",
                    response=f"a {words[i % len(words)]} is a {words[(i + 1) % len(words)]} of {domain}",
                    category="describe", domain=domain, id=f"{domain}-{i}")
            for domain, words in DOMAINS.items() for i in range(per_domain)]


def test_flower_simulation_with_100_supernodes_matches_in_process(saved_tiny_model, tmp_path):
    from flexmoe.config import load_config
    from flexmoe.engine.driver import evaluated_clients, sample_clients
    from flexmoe.engine.simulation import Simulation
    from flexmoe.eval.detail import evaluated_rounds, read_round

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(e.__dict__) + "\n" for e in population_examples(NODES)))
    config_path = tmp_path / "run.toml"
    config_path.write_text(RUN_CONFIG.format(model=saved_tiny_model, data=data, nodes=NODES))
    config = load_config(config_path)
    sampled, evaluated = sample_clients(config.seed, 1, NODES, 2), evaluated_clients(config)
    assert set(sampled) != set(evaluated)  # a sampled client that was not evaluated grafts at its first round
    expected = tmp_path / "in-process"
    Simulation(config, expected).run()

    home, run_dir = tmp_path / "flwr-home", tmp_path / "flower"
    env = {**flower_env(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_base_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_base_port())}
    try:
        for _ in range(3):  # `flwr` gives its local SuperLink a fixed 15 s to start: a loaded machine may need another try
            result = subprocess.run(
                [str(BIN / "flwr"), "run", ".", "local", "--stream", "--federation-config",
                 f"num-supernodes={NODES} client-resources-num-cpus=1",
                 "--run-config", f"config='{config_path}' output-dir='{run_dir}' round-timeout=600.0"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
            )
            if "Failed to start local SuperLink within" not in result.stdout + result.stderr:
                break
            stop(processes_mentioning(str(home)))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:  # `flwr run . local` leaves a background SuperLink running: stop it (and its children)
        stop(processes_mentioning(str(home)))
        assert not processes_mentioning(str(home))
    records = read_metrics(run_dir)
    assert [(r["round"], r["client"]) for r in records if r["kind"] == "train"] == [(1, c) for c in sampled]
    assert [(r["round"], r["client"]) for r in records if r["kind"] == "eval"] == \
        [(n, c) for n in (0, 1) for c in evaluated]
    assert not [r for r in records if r["kind"] == "failure"]
    assert without_bytes(records) == without_bytes(read_metrics(expected))
    assert evaluated_rounds(run_dir / "evals") == evaluated_rounds(expected / "evals") == [0, 1]
    for round_index in (0, 1):
        assert read_round(run_dir / "evals", round_index) == read_round(expected / "evals", round_index)
    # every node said which client it is (the report's client table lists all 100: `clients.json`); only the sampled
    # and the evaluated clients hold personal state, each grafted once
    grafted = sorted(int(p.parent.name) for p in (run_dir / "clients").glob("*/selection.json"))
    assert grafted == sorted(set(sampled) | set(evaluated))
    for client in grafted:
        assert (run_dir / "clients" / str(client) / "selection.json").read_text() == \
            (expected / "clients" / str(client) / "selection.json").read_text()
    clients, in_process = (json.loads((d / "clients.json").read_text()) for d in (run_dir, expected))
    assert [c["client_id"] for c in clients] == list(range(NODES))
    # every node tokenised its data to describe it; in process only the sampled and evaluated clients
    # were tokenised, so only theirs count truncation
    counts = ("truncated", "unusable")
    assert [{k: v for k, v in c.items() if k not in counts} for c in clients] == \
        [{k: v for k, v in c.items() if k not in counts} for c in in_process]
    assert [c for c in clients if c["client_id"] in grafted] == [c for c in in_process if c["client_id"] in grafted]
