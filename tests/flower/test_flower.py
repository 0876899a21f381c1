"""flexmoe as a Flower app, FLEx for 2 rounds on a tiny random model: a `flwr run . local`
simulation; a loopback deployment over TLS with SuperNode authentication (2 registered SuperNodes
and an unregistered one, which is refused), whose SuperNodes keep an audit copy of every message
they send (no personal tensor in it); an insecure deployment where a SuperNode is killed and
restarted, a ClientApp raises, and the ServerApp is killed and the run resumed. Every run's
metrics are compared with the in-process engine's. Deployments are started by
`scripts/flower-deploy.sh`, shared by the tests of a module fixture, and stopped by pid."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from helpers.flower import (
    BIN, ROOT, Deployment, alive, client_dir, clientapps_of, command_line, committed_rounds, descendants, flower_env,
    free_base_port, kill_machine, node_ids_in_log, processes_mentioning, read_metrics, stop, stop_process, wait_until,
    without_bytes,
)

pytestmark = [pytest.mark.flower, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flwr", path=str(BIN)) is None, reason="flwr is not installed")]


def make_certificates(directory: Path) -> Path:
    """A test CA and a loopback server certificate it signs: ca.crt, server.pem, server.key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flexmoe test CA")])

    def certificate(subject, key, issuer_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca = certificate(ca_name, ca_key, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), server_key, ca_key,
        [(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
          False), (x509.BasicConstraints(ca=False, path_length=None), True)],
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return directory


def assert_flex_run_completed(run_dir: Path, client_dirs: list[Path]) -> list[dict]:
    records = read_metrics(run_dir)
    servers = [r for r in records if r["kind"] == "server"]
    assert [r["round"] for r in servers] == [0, 1, 2]
    assert all(r["clients"] == [0, 1] and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in servers[1:])
    train = [r for r in records if r["kind"] == "train"]
    assert [(r["round"], r["client"]) for r in train] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r["loss"] > 0 and r["steps"] == 2 for r in train)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and 0.0 <= summary["rouge_l_avg"] <= 1.0
    assert (run_dir / "report.md").is_file()
    # what the server aggregated is exactly what it received: shared LoRA keys, never a graft
    assert server_keys(run_dir) and all("lora_" in k and "graft" not in k for k in server_keys(run_dir))
    for state in client_dirs:  # the personal state stayed on the client's disk
        assert (state / "personal.safetensors").is_file()
        assert not (state / "pending").exists()  # the last round was committed
    return records


def server_keys(run_dir: Path) -> list[str]:
    with safe_open(str(run_dir / "checkpoints" / "server.safetensors"), "pt") as handle:
        return list(handle.keys())


@pytest.fixture(scope="module")
def in_process_run(run_config, tmp_path_factory) -> Path:
    """The run config through the in-process engine: what every Flower run must reproduce."""
    from flexmoe.config import load_config
    from flexmoe.engine.simulation import Simulation

    run_dir = tmp_path_factory.mktemp("inproc") / "run"
    Simulation(load_config(run_config), run_dir).run()
    return run_dir


@pytest.fixture(scope="module")
def in_process_metrics(in_process_run) -> list[dict]:
    return read_metrics(in_process_run)


def assert_same_evaluation_files(flower: Path, in_process: Path) -> None:
    """Every per-example file (answers, predictions, scores, knowledge items) of the in-process run,
    identical in the Flower run's directory; so are the paired statistics of its summary."""
    from flexmoe.eval.detail import evaluated_rounds, read_round

    rounds = evaluated_rounds(in_process / "evals")
    assert rounds == evaluated_rounds(flower / "evals") == [0, 2]
    for round_index in rounds:
        expected = read_round(in_process / "evals", round_index)
        assert any("-client-" in name for name in expected)
        assert read_round(flower / "evals", round_index) == expected, round_index
    summary = lambda d: json.loads((d / "summary.json").read_text())  # noqa: E731
    assert summary(flower)["rouge_l_vs_base"] == summary(in_process)["rouge_l_vs_base"]


def test_flwr_run_local_simulation_matches_in_process_engine(run_config, in_process_metrics, in_process_run,
                                                            tmp_path):
    home = tmp_path / "flwr-home"
    try:
        result = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "local", "--stream", "--federation-config",
             "num-supernodes=2 client-resources-num-cpus=1",
             "--run-config", f"config='{run_config}' output-dir='{tmp_path / 'flower'}'"],
            cwd=ROOT, env=flower_env(home), capture_output=True, text=True, timeout=420,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:  # `flwr run . local` leaves a background SuperLink running: stop it (and its children)
        stop(processes_mentioning(str(home)))
        assert not processes_mentioning(str(home))
    flower = assert_flex_run_completed(tmp_path / "flower", [tmp_path / "flower" / "clients" / c for c in "01"])
    assert [(r["round"], r["kind"], r.get("client")) for r in flower] == \
        [(r["round"], r["kind"], r.get("client")) for r in in_process_metrics]
    assert without_bytes(flower) == without_bytes(in_process_metrics)
    assert_same_evaluation_files(tmp_path / "flower", in_process_run)


def test_a_client_drops_the_state_of_a_round_the_server_counts_as_failed(tmp_path):
    """A client whose reply was lost (killed after training, too late) must not keep that round's
    state: `settle` promotes pending state only of the round the server last counted for it."""
    from flexmoe.engine.flower.client_app import settle
    from flexmoe.engine.flower.messages import COUNTED_ROUNDS, counted_rounds_text
    from flexmoe.rundir import ClientStore

    for counted, kept in ((0, b"round 0"), (1, b"round 1")):
        store = ClientStore(tmp_path / str(counted))
        store.dir(0).mkdir(parents=True)
        (store.dir(0) / "state.safetensors").write_bytes(b"round 0")
        (store.begin(0) / "state.safetensors").write_bytes(b"round 1")
        store.finish(0, 1)
        settle(store, 0, {COUNTED_ROUNDS: counted_rounds_text({0: counted}), "phase": "train", "committed": 1})
        assert (store.dir(0) / "state.safetensors").read_bytes() == kept and not store.pending(0).exists()


def test_a_client_that_failed_a_round_and_missed_the_next_rejoins_without_that_state(tmp_path):
    """The deployment sequence: a client saves its round-2 state and is killed before replying
    (the server counts round 2 as failed), misses round 3 (offline: failed again), and rejoins
    for round 4. Every message tells it the last round the server counted from it (1), so the
    round-2 state is dropped, whichever message comes first, and it trains on from round 1."""
    from flexmoe.engine.flower.client_app import settle
    from flexmoe.engine.flower.messages import COUNTED_ROUNDS, counted_rounds_text
    from flexmoe.rundir import ClientStore

    for first in ("identify", "train", "eval"):
        store = ClientStore(tmp_path / first)
        store.dir(0).mkdir(parents=True)
        (store.dir(0) / "state.safetensors").write_bytes(b"round 1")  # committed after round 1
        (store.begin(0) / "state.safetensors").write_bytes(b"round 2")  # written, then killed
        store.finish(0, 2)
        # round 4 begins: rounds 1-3 are committed, and the server last counted client 0 in round 1
        settle(store, 0, {COUNTED_ROUNDS: counted_rounds_text({0: 1, 1: 3}), "phase": first, "committed": 3})
        assert not store.pending(0).exists(), first
        assert (store.dir(0) / "state.safetensors").read_bytes() == b"round 1", first


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """TLS with test-made certificates and SuperNode authentication: SuperNodes 0 and 1 registered
    (their key pairs made by the script), each keeping an audit copy of what it sends; SuperNode 2
    has a key pair that was never registered."""
    root = tmp_path_factory.mktemp("secured")
    deployment = Deployment(root / "deploy", audit=True)
    certs = make_certificates(root / "certs")
    try:
        deployment.deploy("start", str(deployment.work), "2", str(free_base_port()), str(certs), "auth")
        deployment.deploy("node", str(deployment.work), "2")
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def secured_run(secured, run_config, tmp_path_factory) -> tuple[Path, str, list[int]]:
    """FLEx on the secured deployment, interrupted: its ServerApp is killed (SIGKILL) while round 1
    trains, and `flwr run` with resume=true finishes the run (the SuperNodes ignore the dead run's
    messages). -> (run dir, the resumed run's log, the rounds committed when the ServerApp died)."""
    root = tmp_path_factory.mktemp("secured-run")
    run_dir = root / "run"
    process = secured.submit(root / "first.log", f"config='{run_config}' output-dir='{run_dir}'")
    nodes = [secured.pid(f"supernode-{c}") for c in (0, 1)]
    try:
        wait_until(lambda: 0 in committed_rounds(run_dir), 300, "round 0")
        wait_until(lambda: any(clientapps_of(node) for node in nodes), 120, "round 1")
        servers = [p for p in descendants(secured.pid("superlink")) if "flwr-serverapp" in command_line(p)]
        assert len(servers) == 1
        os.kill(servers[0], signal.SIGKILL)
    finally:  # `flwr run` only streams the dead run's log now
        stop_process(process)
    interrupted = committed_rounds(run_dir)
    log = secured.run(root / "resume.log", f"resume=true output-dir='{run_dir}'")
    return run_dir, log, interrupted


def test_killed_serverapp_resumes_to_the_uninterrupted_metrics(secured, secured_run, in_process_metrics):
    """The resumed run starts after round 0 (the last checkpoint when the ServerApp died), the clients
    drop their uncommitted round-1 state, and the metrics equal those of the uninterrupted
    in-process run."""
    run_dir, _, interrupted = secured_run
    assert interrupted == [0]
    records = assert_flex_run_completed(run_dir, [client_dir(secured.state(c), run_dir, c) for c in (0, 1)])
    assert without_bytes(records) == without_bytes(in_process_metrics)


def test_tls_supernode_auth_registered_nodes_train_unregistered_is_refused(secured, secured_run):
    run_dir, log, _ = secured_run
    assert_flex_run_completed(run_dir, [client_dir(secured.state(c), run_dir, c) for c in (0, 1)])
    # the unregistered SuperNode was refused at activation and gave up: it never got a message
    intruder = secured.work / "node-2"
    assert not alive(secured.pid("supernode-2"))
    assert "Failed to activate SuperNode" in (intruder / "supernode.log").read_text()
    assert "No SuperNode found with the given public key" in (secured.work / "superlink.log").read_text()
    assert not (intruder / "audit").exists() and not any((intruder / "state").iterdir())
    listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", "flexmoe-deploy", "--format", "json"],
                            cwd=ROOT, env=secured.env, capture_output=True, text=True, timeout=120, check=True)
    nodes = json.loads(listed.stdout)["nodes"]
    assert len(nodes) == 2 and all(n["status"] == "online" for n in nodes)
    assert "failed" not in log  # no client failed: only the two registered nodes took part


def audited_messages(audit: Path) -> list[tuple[dict[str, bytes], object]]:
    """Every message an audited SuperNode sent: (its objects by id, the Message inflated from them)."""
    from flwr.supercore.inflatable.inflatable_object import get_object_type_from_object_content
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    messages = []
    for folder in sorted(audit.glob("*/*")):
        objects = {path.name: path.read_bytes() for path in folder.iterdir()}
        assert all(hashlib.sha256(content).hexdigest() == oid for oid, content in objects.items())
        top = [oid for oid, content in objects.items() if get_object_type_from_object_content(content) == "Message"]
        assert len(top) == 1
        messages.append((objects, inflate_object_from_contents(top[0], dict(objects), keep_object_contents=True)))
    return messages


def fingerprints(tensor) -> list[bytes]:
    """Byte patterns that would betray `tensor` on the wire: all of it and each of its rows, as stored
    and as float32 (the dtype tensors travel in); rows too short or too uniform to be telling are left out."""
    import torch

    patterns = []
    for version in {tensor.dtype: tensor, torch.float32: tensor.float()}.values():
        flat = version.contiguous()
        patterns.append(flat.numpy().tobytes())
        for row in flat.reshape(-1, flat.shape[-1]) if flat.dim() > 1 else []:
            if row.numel() * row.element_size() >= 32 and row.unique().numel() > 4:
                patterns.append(row.numpy().tobytes())
    return patterns


def test_no_personal_tensor_leaves_a_client(secured, secured_run):
    """Every message each SuperNode sent, captured as Flower transfers it, holds no grafted expert or
    gate: no key naming a graft, and none of the bytes of any personal tensor or of any of its rows."""
    import torch

    from flexmoe.models.graft_file import read_graft

    run_dir, _, _ = secured_run
    uploads, wire = {}, {}
    for client in (0, 1):
        messages = audited_messages(secured.work / f"node-{client}" / "audit")
        # the first run: round-0 evaluation (and a round-1 training if it finished before the kill);
        # the resumed run: identification, 2 trainings, final evaluation, final commit
        assert len(messages) >= 6
        personal, _ = read_graft(client_dir(secured.state(client), run_dir, client) / "personal.safetensors")
        secrets = [p for key, t in personal.items() if t.is_floating_point() for p in fingerprints(t)]
        assert len(secrets) > 10
        for objects, message in messages:
            wire.setdefault(client, []).extend(objects.values())
            for content in objects.values():
                assert b"graft" not in content
                assert not any(secret in content for secret in secrets)
            arrays = {key: torch.from_numpy(array.numpy().copy())
                      for record in message.content.array_records.values() for key, array in record.items()}
            assert not [key for key in arrays if "graft" in key]
            result = json.loads(str(message.content["result"]["record"]))
            if result.get("kind") == "train" and result["round"] == 2:
                uploads[client] = arrays
    # the capture is what the server aggregated: its last global weights are the example-weighted
    # mean of the two clients' last uploads (FedAvg)
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train" and r["round"] == 2]
    weights = {r["client"]: r["num_examples"] / sum(t["num_examples"] for t in train) for r in train}
    from safetensors.torch import load_file

    global_weights = {k.removeprefix("global."): v for k, v in
                      load_file(str(run_dir / "checkpoints" / "server.safetensors")).items() if k.startswith("global.")}
    assert set(uploads[0]) == set(uploads[1]) == set(global_weights)
    # and the byte scan sees tensors that did travel: every row of every upload is in the captured bytes
    for client, arrays in uploads.items():
        for tensor in arrays.values():
            assert all(any(p in content for content in wire[client]) for p in fingerprints(tensor))
    for key, value in global_weights.items():
        torch.testing.assert_close(value, weights[0] * uploads[0][key] + weights[1] * uploads[1][key])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """An insecure loopback deployment with SuperNodes 0 and 1 (a restarted node gets a new node id)."""
    deployment = Deployment(tmp_path_factory.mktemp("plain") / "deploy")
    try:
        deployment.deploy("start", str(deployment.work), "2", str(free_base_port()))
        yield deployment
    finally:
        deployment.stop()


def test_killed_supernode_is_skipped_then_rejoins_with_its_personal_state(plain, run_config, tmp_path):
    """Round 1: SuperNode 1 is killed (SIGKILL, with its ClientApp) once it started its training, and
    restarted with the same node config; the round completes with client 0. Round 2: client 0's
    ClientApp raises (its personal state was corrupted) and is skipped; client 1 is back, on a new
    node id, and trains from the graft it made before the kill (not grafted again)."""
    run_dir = tmp_path / "run"
    process = plain.submit(tmp_path / "flwr.log", f"config='{run_config}' output-dir='{run_dir}'")
    try:
        wait_until(lambda: 0 in committed_rounds(run_dir), 300, "round 0")
        node = plain.pid("supernode-1")
        wait_until(lambda: clientapps_of(node), 120, "SuperNode 1's round-1 ClientApp")
        graft_dir = client_dir(plain.state(1), run_dir, 1)
        selection = graft_dir / "selection.json"
        before = selection.read_bytes(), selection.stat().st_mtime_ns, sha256(graft_dir / "personal.safetensors")
        kill_machine(node)
        wait_until(lambda: not alive(node), 10, "the killed SuperNode to exit")
        plain.deploy("node", str(plain.work), "1")
        wait_until(lambda: 1 in committed_rounds(run_dir), 300, "round 1")
        corrupt_latest_personal(client_dir(plain.state(0), run_dir, 0))
        assert process.wait(timeout=420) == 0
    finally:
        stop_process(process)
    log = (tmp_path / "flwr.log").read_text()
    node_ids = {c: node_ids_in_log(plain.work / f"node-{c}" / "supernode.log")[-2 if c else -1] for c in (0, 1)}
    restarted = node_ids_in_log(plain.work / "node-1" / "supernode.log")[-1]
    records = read_metrics(run_dir)
    assert [(r["round"], r["client"]) for r in records if r["kind"] == "train"] == [(1, 0), (2, 1)]
    servers = [r for r in records if r["kind"] == "server"]
    assert [(r["round"], r.get("clients"), r.get("failed")) for r in servers] == \
        [(0, None, None), (1, [0, 1], [1]), (2, [0, 1], [0])]
    failures = [(r["round"], r["client"], r["error"]) for r in records if r["kind"] == "failure"]
    assert [f[:2] for f in failures] == [(1, 1), (2, 0)] and "Node Unavailable" in failures[0][2]
    assert [r["client"] for r in records if r["kind"] == "eval" and r["round"] == 2] == [1]
    assert json.loads((run_dir / "summary.json").read_text())["rounds_completed"] == 2
    assert f"round 1 train: client 1 (node {node_ids[1]}) failed: Error: Node Unavailable" in log, log[-4000:]
    assert f"round 2 train: client 0 (node {node_ids[0]}) failed" in log and "not a readable safetensors" in log
    assert restarted != node_ids[1] and f"client 1 is back, on node {restarted} (was node {node_ids[1]})" in log
    # client 1 kept its graft: the selection was not made again, and round 2 trained the graft further
    assert (selection.read_bytes(), selection.stat().st_mtime_ns) == before[:2]
    assert sha256(graft_dir / "personal.safetensors") != before[2] and not (graft_dir / "pending").exists()


def corrupt_latest_personal(client: Path) -> None:
    """Cut client's newest personal-state file (its round-1 state, pending until its next call) in half."""
    for path in (client / "pending" / "personal.safetensors", client / "personal.safetensors"):
        try:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            return
        except FileNotFoundError:  # promoted meanwhile
            continue
    raise AssertionError(f"no personal state in {client}")


@pytest.fixture(scope="module")
def sampled_run_config(run_config) -> Path:
    """The run config with one client of two per round (seed 6 samples client 0 in round 1, client 1
    in round 2) and evaluation after the last round only: after its round-1 reply client 0 gets no
    message until the run ends, so its round-1 state stays pending on its disk."""
    path = run_config.parent / "sampled.toml"
    text = run_config.read_text().replace("clients_per_round = 2", "clients_per_round = 1")
    path.write_text(text.replace("seed = 3", "seed = 6").replace("[eval]\n", "[eval]\nevery = 0\n"))
    return path


def test_resumed_run_with_sampled_clients_keeps_every_counted_round(plain, sampled_run_config, tmp_path):
    """The ServerApp is killed (SIGKILL) while round 2 trains client 1; `resume=true` asks every node
    which client it is. Client 0's round-1 state, counted by the server but still pending, must be
    kept (the message says client 0's last counted round is 1): the resumed run's metrics equal
    those of the uninterrupted in-process run."""
    from flexmoe.config import load_config
    from flexmoe.engine.simulation import Simulation
    from flexmoe.engine.driver import sample_clients

    assert [sample_clients(6, r, 2, 1) for r in (1, 2)] == [[0], [1]]
    expected = tmp_path / "in-process"
    Simulation(load_config(sampled_run_config), expected).run()
    run_dir = tmp_path / "run"
    # no client may be skipped for being slow (a failure would change the metrics): generous timeouts
    process = plain.submit(tmp_path / "first.log", f"config='{sampled_run_config}' output-dir='{run_dir}'", 900.0)
    try:
        wait_until(lambda: 1 in committed_rounds(run_dir), 900, "round 1")
        servers = [p for p in descendants(plain.pid("superlink")) if "flwr-serverapp" in command_line(p)]
        assert len(servers) == 1
        os.kill(servers[0], signal.SIGKILL)
    finally:  # `flwr run` only streams the dead run's log now
        stop_process(process)
    assert committed_rounds(run_dir) == [0, 1]
    assert (client_dir(plain.state(0), run_dir, 0) / "pending").is_dir()  # round 1, not promoted yet
    plain.run(tmp_path / "resume.log", f"resume=true output-dir='{run_dir}'", timeout=1800, round_timeout=900.0)
    records = read_metrics(run_dir)
    assert [(r["round"], r["client"]) for r in records if r["kind"] == "train"] == [(1, 0), (2, 1)]
    assert without_bytes(records) == without_bytes(read_metrics(expected))
