"""Secure aggregation (`secagg.enabled`, Flower's SecAgg+) in a real loopback deployment: a SuperLink
and 3 SuperNodes started by `scripts/flower-deploy.sh` (stopped by pid), FedAvg for one round on
the tiny model. The securely aggregated global weights equal those of the in-process engine, which
averages the same clients' updates in the clear, within the bound SecAgg+'s quantisation allows
(computed below from its clipping range, quantisation levels and the clients' weights); then a
SuperNode killed after it shared its keys, while it trains, does not stall the round: the others'
updates are unmasked and averaged, again equal to the in-process average of those clients."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from helpers.flower import BIN, Deployment, alive, free_base_port, kill_machine, read_metrics, stop_process, wait_until

pytestmark = [pytest.mark.flower, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flwr", path=str(BIN)) is None, reason="flwr is not installed")]

CLIENTS = 3
RUN_CONFIG = """\
method = "fedavg"
model = "{model}"
rounds = 1
num_clients = 3
clients_per_round = 3
seed = 5
[data]
source = "{data}"
test_fraction = 0.2
[train]
local_steps = 2
batch_size = 4
max_length = 64
lr = 5e-3
[lora]
r = 2
[eval]
every = 0
base = false
content_free = false
global_model = false
knowledge = false
max_test_examples = 1
max_new_tokens = 2
[secagg]
enabled = true
clipping_range = 1e-3  # above every weighted value of this run (none is clipped), so the bound is tight
"""
ROUND_TIMEOUT = 600.0  # SecAgg+'s timeout per stage: a stalled round would wait this long
FLOAT32_SLACK = 1e-6  # the two engines add in float32, in different orders


@pytest.fixture(scope="module")
def secagg_config(tmp_path_factory, saved_tiny_model) -> Path:
    from helpers.engine import synthetic_examples

    root = tmp_path_factory.mktemp("secagg")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(e.__dict__) + "\n" for e in synthetic_examples()))
    path = root / "run.toml"
    path.write_text(RUN_CONFIG.format(model=saved_tiny_model, data=data))
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """An insecure loopback deployment with SuperNodes 0, 1 and 2."""
    deployed = Deployment(tmp_path_factory.mktemp("secagg-deploy") / "deploy")
    try:
        deployed.deploy("start", str(deployed.work), str(CLIENTS), str(free_base_port()))
        yield deployed
    finally:
        deployed.stop()


def in_process_global(config_path: Path, run_dir: Path, failing: set[int] = frozenset()):
    """The in-process engine's global weights after round 1 of the same run in the clear (clients in
    `failing` crash in training, so the round averages the others)."""
    from flexmoe.config import load_config
    from flexmoe.engine import simulation
    from flexmoe.rundir import load_server

    original = simulation.InProcess._train_client

    def train_client(self, client, round_index, down_blob):
        if client.client_id in failing:
            raise RuntimeError("this client's machine died")
        return original(self, client, round_index, down_blob)

    simulation.InProcess._train_client = train_client
    try:
        simulation.Simulation(load_config(config_path, ["secagg.enabled=false"]), run_dir).run()
    finally:
        simulation.InProcess._train_client = original
    return load_server(run_dir)[1]


def quantisation_bound(weights: list[int], secagg, largest: float) -> float:
    """How far SecAgg+'s mean may lie from the exact weighted mean. Client i scales its update by
    d_i = round(w_i / max_weight * T) / T (T = quantization_range levels), clips to +-c and rounds
    stochastically to steps of 2c / T (error < 1 step per value); the server divides the sum by the
    sum of the d_i. So the error is below n * 2c / (T * sum d) (rounding) plus the change of the
    normalised weights from w_i / sum w to d_i / sum d, times the largest update (< c / d_i when no
    value was clipped), plus float32 rounding of weights of magnitude `largest`."""
    levels, c = secagg.quantization_range, secagg.clipping_range
    d = [round(w / secagg.max_weight * levels) / levels for w in weights]
    rounding = len(weights) * 2 * c / (levels * sum(d))
    reweighting = sum(abs(di / sum(d) - w / sum(weights)) for di, w in zip(d, weights)) * c / min(d)
    return rounding + reweighting + FLOAT32_SLACK * max(1.0, largest)


def secure_global(deployment, config_path: Path, run_dir: Path, log: Path, kill_node: int | None = None):
    """Run the deployment's SecAgg+ round; with `kill_node`, kill that SuperNode (SIGKILL, with its
    ClientApp) once it received the round's third SecAgg+ message (its keys are shared, it trains)."""
    from flexmoe.rundir import load_server

    if kill_node is not None:
        node_log = deployment.work / f"node-{kill_node}" / "supernode.log"
        seen = node_log.read_text().count("Receiving: train message")  # earlier runs' messages
        node = deployment.pid(f"supernode-{kill_node}")
    started = time.monotonic()
    process = deployment.submit(log, f"config='{config_path}' output-dir='{run_dir}'", round_timeout=ROUND_TIMEOUT)
    try:
        if kill_node is not None:
            wait_until(lambda: node_log.read_text().count("Receiving: train message") >= seen + 3, 300,
                       f"SuperNode {kill_node} to receive its masked-vector stage")
            kill_machine(node)
            wait_until(lambda: not alive(node), 10, "the killed SuperNode to exit")
        assert process.wait(timeout=ROUND_TIMEOUT + 60) == 0, log.read_text()[-4000:]
    finally:
        stop_process(process)
    return load_server(run_dir)[1], read_metrics(run_dir), time.monotonic() - started


def largest_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def assert_secure_mean_within_quantisation(secure, plain, records, clients, config_path):
    from flexmoe.config import load_config

    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["client"])
    assert [r["client"] for r in train] == clients and all(r["secagg_clipped"] == 0 for r in train)
    largest = max(float(t.abs().max()) for t in plain.values())
    bound = quantisation_bound([r["num_examples"] for r in train], load_config(config_path, []).secagg, largest)
    error = largest_difference(secure, plain)
    # the shared update itself (LoRA B starts at zero, so its global value is the mean update)
    update = max(float(plain[n].abs().max()) for n in plain if "lora_B" in n)
    assert 0 < error <= bound, (error, bound)  # quantised (not the clear mean), within SecAgg+'s rounding
    assert bound < 0.01 * update  # tight enough that a wrong aggregate (another weighting) would fail


def test_secure_aggregate_equals_the_plain_weighted_mean_within_quantisation(deployment, secagg_config, tmp_path):
    plain = in_process_global(secagg_config, tmp_path / "inproc")
    secure, records, _ = secure_global(deployment, secagg_config, tmp_path / "run", tmp_path / "flwr.log")
    assert_secure_mean_within_quantisation(secure, plain, records, [0, 1, 2], secagg_config)
    servers = [r for r in records if r["kind"] == "server" and r["round"] == 1]
    assert servers and not servers[0].get("failed")
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in train)


def test_a_supernode_killed_mid_round_does_not_stall_it(deployment, secagg_config, tmp_path):
    plain = in_process_global(secagg_config, tmp_path / "inproc", failing={2})
    secure, records, seconds = secure_global(deployment, secagg_config, tmp_path / "run", tmp_path / "flwr.log",
                                             kill_node=2)
    assert_secure_mean_within_quantisation(secure, plain, records, [0, 1], secagg_config)
    failures = [(r["round"], r["client"]) for r in records if r["kind"] == "failure" and "SecAgg+" in r["error"]]
    assert failures == [(1, 2)], records
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds_completed"] == 1
    # the round ended when the SuperLink declared the node gone, not at the round timeout
    assert seconds < ROUND_TIMEOUT, seconds
