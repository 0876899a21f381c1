"""flexmoe as a Flower app: a real loopback deployment over TLS (SuperLink + 2 SuperNodes started
by `scripts/flower-deploy.sh`) and a `flwr run . local` simulation, each running FLEx for 2 rounds
on a tiny random model; the simulation's metrics are compared with the in-process engine's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.flower, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flwr", path=str(BIN)) is None, reason="flwr is not installed")]

RUN_CONFIG = """\
model = "{model}"
rounds = 2
num_clients = 2
clients_per_round = 2
seed = 3
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
[flex]
calibration_examples = 4
[eval]
max_test_examples = 2
max_new_tokens = 4
knowledge_max_docs = 2
knowledge_max_length = 32
probes = false
"""


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    """A tiny random qwen2_moe, its data file and a FLEx run config, all in a temp dir."""
    from conftest import tiny_model
    from test_engine import build_tokenizer, synthetic_examples

    root = tmp_path_factory.mktemp("flower")
    model_dir = root / "model"
    vocab = build_tokenizer(model_dir)
    tiny_model("qwen2_moe", vocab_size=vocab, max_position_embeddings=128).save_pretrained(model_dir)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(e.__dict__) + "\n" for e in synthetic_examples()))
    path = root / "run.toml"
    path.write_text(RUN_CONFIG.format(model=model_dir, data=data))
    return path


def flower_env(home: Path) -> dict:
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def free_base_port() -> int:
    """A base port whose block (base .. base+4) is free on loopback."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 4 < 65536 and all(_free(base + i) for i in range(5)):
            return base
    raise RuntimeError("no free port block")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose full command line contains `text` (our temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if text in args and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is stopped
        return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0].startswith("Z")
    except OSError:
        return False


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


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_flex_run_completed(run_dir: Path, state_dirs: list[Path]) -> list[dict]:
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
    with safe_open(str(run_dir / "checkpoints" / "server.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all("lora_" in k and "graft" not in k for k in keys)
    for client, state in enumerate(state_dirs):  # the personal state stayed on the client's disk
        assert (state / str(client) / "personal.safetensors").is_file()
        assert not (state / str(client) / "pending").exists()  # the last round was committed
    return records


def test_loopback_deployment_with_tls_two_supernodes(run_config, tmp_path):
    """SuperLink and SuperNodes over TLS with test-made certificates, as a real deployment."""
    work, home = tmp_path / "deploy", tmp_path / "flwr-home"
    env = flower_env(home)
    script = ROOT / "scripts" / "flower-deploy.sh"
    certs = make_certificates(tmp_path / "certs")
    try:
        subprocess.run([str(script), "start", str(work), "2", str(free_base_port()), str(certs)], check=True,
                       env=env, capture_output=True, text=True, timeout=60)
        result = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "flexmoe-deploy", "--stream", "--run-config",
             f"config='{run_config}' output-dir='{tmp_path / 'run'}' round-timeout=300.0 connect-timeout=120.0"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert_flex_run_completed(tmp_path / "run", [work / f"node-{i}" / "state" for i in range(2)])
    finally:
        pids = [int(p.read_text()) for p in work.glob("*.pid")]
        subprocess.run([str(script), "stop", str(work)], env=env, timeout=60)
        stop(processes_mentioning(str(tmp_path)))  # anything Flower started on our behalf
        assert pids and not any(_alive(pid) for pid in pids)
        assert not processes_mentioning(str(tmp_path))


def test_flwr_run_local_simulation_matches_in_process_engine(run_config, tmp_path):
    from flexmoe.config import load_config
    from flexmoe.engine.simulation import Simulation

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
    flower = assert_flex_run_completed(tmp_path / "flower", [tmp_path / "flower" / "clients"])

    Simulation(load_config(run_config), tmp_path / "inproc").run()
    in_process = read_metrics(tmp_path / "inproc")
    assert len(flower) == len(in_process)
    for a, b in zip(flower, in_process):
        assert (a["round"], a["kind"], a.get("client")) == (b["round"], b["kind"], b.get("client"))
        bytes_free = {k: v for k, v in a.items() if not k.startswith("bytes_")}
        assert bytes_free == {k: v for k, v in b.items() if not k.startswith("bytes_")}
