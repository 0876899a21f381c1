"""Reliability of the engine-agnostic core and the in-process engine: crashing clients are
skipped and keep their state; checksummed files refuse corruption; the server rejects bad
updates; FLEx's personal tensors never leave a client (by key and by value); the optional
differential privacy clips, noises and accounts as specified."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import flexmoe.engine.local_clients as local_clients
from flexmoe.config import load_config
from flexmoe.engine import privacy
from flexmoe.engine.server import ServerRunner
from flexmoe.engine.progress import Progress
from flexmoe.engine.simulation import Simulation
from flexmoe.errors import FlexmoeError
from flexmoe.wire import deserialize, serialize
from flexmoe.files import CHECKSUM, load_checked, save_checked, tensors_digest, unpack_metadata
from flexmoe.methods.build import build_method
from flexmoe.methods.rules import Reply
from flexmoe.methods.base import weighted_mean

from helpers.engine import engine_config, metrics, run
from helpers.leaks import leaks
from helpers.paths import REPO_ROOT, TESTS

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checked(path)[0]


# ---- crashing clients ----------------------------------------------------------------------------
class CrashingClients(Progress):
    """A progress callback that makes the chosen (round, client)s raise: "step" inside local
    training (after the first optimiser step), "done" once its new state is saved as pending.
    It also snapshots the client files when round 1 starts."""

    def __init__(self, crashes: dict[tuple[int, int], str], run_dir: Path):
        self.crashes, self.run_dir = crashes, run_dir
        self.round = self.client = -1
        self.before_round_1: dict[str, bytes] = {}

    def round_started(self, round_index: int, clients: list[int]) -> None:
        self.round = round_index
        if round_index == 1:
            self.before_round_1 = {str(p.relative_to(self.run_dir)): p.read_bytes()
                                   for p in self.run_dir.glob("clients/*/*.safetensors")}

    def client_started(self, client_id: int, steps: int) -> None:
        self.client = client_id

    def step(self, step: int, steps: int, loss: float) -> None:
        self._crash_at("step")

    def client_done(self, client_id: int, loss: float) -> None:
        self._crash_at("done")

    def _crash_at(self, moment: str) -> None:
        if self.crashes.get((self.round, self.client)) == moment:
            raise RuntimeError(f"simulated crash of client {self.client}")


@pytest.mark.slow
def test_a_client_that_failed_after_saving_and_missed_the_next_round_trains_on_from_its_last_counted_round(
        model_dir, tmp_path):
    """The deployment sequence in process: client 1 fails round 2 after its new state is on disk,
    fails round 3 too, and trains again in round 4. It must continue from its round-1 state, so
    the run equals one where its round-2 failure came before anything was saved."""
    config = engine_config(model_dir, "method=flex", "rounds=4", "clients_per_round=4", "eval.base=false")
    after_saving = CrashingClients({(2, 1): "done", (3, 1): "step"}, tmp_path / "a")
    before_saving = CrashingClients({(2, 1): "step", (3, 1): "step"}, tmp_path / "b")
    Simulation(config, tmp_path / "a", after_saving).run()
    Simulation(config, tmp_path / "b", before_saving).run()
    records = metrics(tmp_path / "a")
    assert [(r["round"], r["client"]) for r in records if r["kind"] == "failure"] == [(2, 1), (3, 1)]
    assert any(r["kind"] == "train" and (r["round"], r["client"]) == (4, 1) for r in records)
    assert records == metrics(tmp_path / "b")
    for name in ("state.safetensors", "personal.safetensors"):
        assert (tmp_path / "a/clients/1" / name).read_bytes() == (tmp_path / "b/clients/1" / name).read_bytes()


@pytest.mark.slow
def test_crashing_clients_are_skipped_logged_and_keep_their_state(model_dir, tmp_path, monkeypatch, caplog):
    uploads: dict[int, bytes] = {}

    def recording_serialize(tensors, metadata=None):
        blob = serialize(tensors, metadata)
        if metadata and "num_examples" in metadata:  # an uplink
            uploads[len(uploads)] = blob
        return blob

    monkeypatch.setattr(local_clients, "serialize", recording_serialize)
    config = engine_config(model_dir, "method=flex", "rounds=2", "clients_per_round=4")
    progress = CrashingClients({(1, 1): "step", (1, 3): "done"}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="flexmoe.engine"):
        Simulation(config, tmp_path, progress).run(stop_after=1)
    records = metrics(tmp_path)
    assert sorted(r["client"] for r in records if r["kind"] == "train") == [0, 2]
    failures = [r for r in records if r["kind"] == "failure"]
    assert [(r["round"], r["client"]) for r in failures] == [(1, 1), (1, 3)]
    assert failures[0]["error"] == "RuntimeError: simulated crash of client 1"
    server = next(r for r in records if r["kind"] == "server" and r["round"] == 1)
    assert server["failed"] == [1, 3] and server["clients"] == [0, 1, 2, 3]
    assert "round 1: client 3 failed (RuntimeError: simulated crash of client 3)" in caplog.text
    # the round aggregated the two survivors' uploads (weighted by their examples)
    replies = [deserialize(blob) for blob in uploads.values()]
    expected = weighted_mean([t for t, _ in replies], [int(m["num_examples"]) for _, m in replies])
    stored = read_tensors(tmp_path / "checkpoints" / "server.safetensors")
    assert len(replies) == 2
    for name, value in expected.items():
        assert torch.equal(stored["global." + name], value), name
    # the crashed clients kept their pre-round files byte for byte; no pending state is left
    assert not list(tmp_path.glob("clients/*/pending"))
    for client in (1, 3):
        for name in ("personal.safetensors", "state.safetensors"):
            key = f"clients/{client}/{name}"
            path = tmp_path / key
            assert (key in progress.before_round_1) == path.exists()
            if path.exists():
                assert path.read_bytes() == progress.before_round_1[key]
    # ...and train on in the next round from that state
    Simulation.resume(tmp_path)
    round_2 = [r for r in metrics(tmp_path) if r["round"] == 2]
    assert sorted(r["client"] for r in round_2 if r["kind"] == "train") == [0, 1, 2, 3]
    assert (tmp_path / "clients/1/personal.safetensors").read_bytes() != progress.before_round_1[
        "clients/1/personal.safetensors"]


def test_a_round_where_every_client_fails_leaves_the_global_model_unchanged(model_dir, tmp_path):
    config = engine_config(model_dir, "method=fedavg", "rounds=1", "eval.base=false")
    Simulation(config, tmp_path, CrashingClients({(1, c): "step" for c in range(4)}, tmp_path)).run()
    initial = read_tensors(tmp_path / "checkpoints" / "initial.safetensors")
    final = read_tensors(tmp_path / "checkpoints" / "server.safetensors")
    assert all(torch.equal(final["global." + n], t) for n, t in initial.items())
    assert json.loads((tmp_path / "summary.json").read_text())["rounds_completed"] == 1


# ---- checksummed files ---------------------------------------------------------------------------
def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(8, 16, generator=generator), "b": torch.randn(16, generator=generator).bfloat16(),
            "ids": torch.tensor([3, 1], dtype=torch.int64), "flag": torch.tensor(True), "step": torch.tensor(2.5)}


def data_start(path: Path) -> int:
    blob = path.read_bytes()
    return 8 + int.from_bytes(blob[:8], "little")


def test_checksummed_file_round_trips(tmp_path):
    tensors = sample_tensors()
    path = save_checked(tmp_path / "t.safetensors", tensors, {"round": "3"})
    loaded, metadata = load_checked(path)
    assert metadata == {"round": "3"}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:  # the stored digest is sha256 of the tensors, recomputable
        assert unpack_metadata(handle.metadata())[CHECKSUM] == tensors_digest(tensors)
    changed = dict(tensors, w=tensors["w"].clone())
    changed["w"][3, 5] += 1e-6
    assert tensors_digest(changed) != tensors_digest(tensors)


_WRITE_IN_A_NEW_PROCESS = """
import sys, torch
from flexmoe.files import save_checked
torch.manual_seed(0)
tensors = {name: torch.randn(3, 5) for name in ("b", "a", "layer.0.w", "layer.10.w")}
save_checked(sys.argv[1], tensors, {"round": "3", "base": "abc", "selection": "[1, 2]", "k": "1", "gate": "sigmoid"})
"""


def test_two_processes_write_identical_bytes(tmp_path):
    """Checkpoints and personal state are byte-reproducible: the same tensors and metadata give the
    same file (and sha256) in every process, whatever its hash seed."""
    import os
    import subprocess
    import sys

    paths = [tmp_path / f"{seed}.safetensors" for seed in ("1", "2", "3")]
    for seed, path in zip(("1", "2", "3"), paths):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _WRITE_IN_A_NEW_PROCESS, str(path)], env=env, check=True)
    blobs = [path.read_bytes() for path in paths]
    assert blobs[0] == blobs[1] == blobs[2]
    assert load_checked(paths[0])[1] == {"round": "3", "base": "abc", "selection": "[1, 2]", "k": "1",
                                         "gate": "sigmoid"}


@pytest.mark.parametrize("offset", [0, 1, 100, -1])
def test_a_flipped_data_byte_is_refused(tmp_path, offset):
    path = save_checked(tmp_path / "t.safetensors", sample_tensors())
    blob = bytearray(path.read_bytes())
    position = data_start(path) + offset if offset >= 0 else len(blob) + offset
    blob[position] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(FlexmoeError, match=r"t\.safetensors: checksum mismatch, the file is corrupted"):
        load_checked(path)


@pytest.mark.parametrize("keep", [0, 7, 20, "header", "half", -1])
def test_a_truncated_file_is_refused(tmp_path, keep):
    path = save_checked(tmp_path / "t.safetensors", sample_tensors())
    blob = path.read_bytes()
    cut = {"header": data_start(path), "half": (data_start(path) + len(blob)) // 2, -1: len(blob) - 1}.get(keep, keep)
    path.write_bytes(blob[:cut])
    with pytest.raises(FlexmoeError, match=r"t\.safetensors: unreadable or truncated safetensors file") as err:
        load_checked(path)
    assert "\n" not in str(err.value)


def test_a_file_without_checksum_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FlexmoeError, match="plain.safetensors: carries no checksum"):
        load_checked(tmp_path / "plain.safetensors")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = save_checked(tmp_path / "t.safetensors", {"w": torch.zeros(3)})
    old = path.read_bytes()

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(FlexmoeError, match=r"cannot write '.*t\.safetensors': No space left on device"):
        save_checked(path, {"w": torch.ones(3)})
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def corrupt(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[data_start(path) + 2] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("victim", ["checkpoints/server.safetensors", "clients/0/state.safetensors",
                                    "clients/0/personal.safetensors", "checkpoints/initial.safetensors"])
def test_resume_refuses_a_corrupted_run_file_in_one_line(model_dir, tmp_path, capsys, victim):
    from flexmoe.cli import main

    Simulation(engine_config(model_dir, "method=flex", "rounds=2", "clients_per_round=4", "eval.base=false"),
               tmp_path).run(stop_after=1)
    corrupt(tmp_path / victim)
    assert main(["run", "--quiet", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # (--quiet progress lines come first)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flexmoe run: error: ") and f"{victim}: checksum mismatch" in last, err


def test_a_truncated_personal_state_is_refused(model_dir, tmp_path):
    Simulation(engine_config(model_dir, "method=flex", "rounds=1", "eval.base=false"), tmp_path).run()
    path = tmp_path / "clients" / "2" / "personal.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    from flexmoe.engine.restore import restore

    with pytest.raises(FlexmoeError, match=r"clients/2/personal\.safetensors: (not a readable|unreadable)"):
        restore(tmp_path, 2)


# ---- update validation ---------------------------------------------------------------------------
def server_with(tmp_path: Path, *overrides: str) -> ServerRunner:
    config = load_config(None, ["num_clients=4", "clients_per_round=3", *overrides])
    server = ServerRunner(config, build_method(config), tmp_path)
    generator = torch.Generator().manual_seed(1)
    server.global_weights = {"a.lora_A.weight": torch.randn(2, 6, generator=generator),
                             "a.lora_B.weight": torch.zeros(6, 2)}
    server.server_state = server.method.init_server_state(server.global_weights)
    return server


def shifted(server: ServerRunner, by: float, client: int, num_examples: int = 10) -> Reply:
    return Reply({n: t + by for n, t in server.global_weights.items()}, num_examples, client=client)


def bad_replies(server: ServerRunner) -> dict[str, tuple[Reply, str]]:
    good = shifted(server, 0.1, client=7).tensors
    a, b = "a.lora_A.weight", "a.lora_B.weight"
    nan, inf = good[a].clone(), good[b].clone()
    nan[0, 0], inf[1, 1] = float("nan"), float("-inf")
    return {
        "missing key": ({a: good[a]}, f"missing tensor '{b}'"),
        "extra key": ({**good, "x.graft.w": torch.zeros(2)}, "unexpected tensor 'x.graft.w'"),
        "shape": ({a: good[a], b: good[b].T.contiguous()}, f"tensor '{b}' has shape (2, 6), expected (6, 2)"),
        "dtype": ({a: good[a].half(), b: good[b]}, f"tensor '{a}' has dtype torch.float16, expected torch.float32"),
        "nan": ({a: nan, b: good[b]}, f"tensor '{a}' holds NaN or Inf"),
        "inf": ({a: good[a], b: inf}, f"tensor '{b}' holds NaN or Inf"),
        "norm": ({n: t + 100.0 for n, t in server.global_weights.items()}, "update norm 489.898 exceeds "
                 "validation.max_update_norm = 50"),
    }


@pytest.mark.parametrize("case", ["missing key", "extra key", "shape", "dtype", "nan", "inf", "norm", "examples"])
def test_a_bad_update_is_rejected_and_the_round_goes_on(tmp_path, caplog, case):
    server = server_with(tmp_path, "method=fedavg", "validation.max_update_norm=50")
    good = [shifted(server, 0.1, client=0, num_examples=10), shifted(server, 0.3, client=2, num_examples=30)]
    if case == "examples":
        bad, reason = Reply(shifted(server, 0.2, client=5).tensors, 0, client=5), "num_examples = 0"
    else:
        tensors, reason = bad_replies(server)[case]
        bad = Reply(tensors, 10, client=5)
    with caplog.at_level(logging.WARNING, logger="flexmoe.engine"):
        agg = server.aggregate([good[0], bad, good[1]])
    assert agg["rejected"] == [{"client": 5, "reason": agg["rejected"][0]["reason"]}]
    assert agg["rejected"][0]["reason"].startswith(reason)
    assert f"round 1: update of client 5 rejected: {reason}" in caplog.text
    expected = weighted_mean([r.tensors for r in good], [10, 30])  # as if the bad reply had never come
    assert all(torch.equal(server.global_weights[n], t) for n, t in expected.items())


def test_when_every_update_is_rejected_the_global_model_stays(tmp_path, caplog):
    server = server_with(tmp_path, "method=fedadam")
    before = {n: t.clone() for n, t in server.global_weights.items()}
    state = {n: t.clone() for n, t in server.server_state.items()}
    bad = [Reply(tensors, 10, client=c) for c, (tensors, _) in enumerate(bad_replies(server).values()) if c < 6]
    with caplog.at_level(logging.WARNING, logger="flexmoe.engine"):
        agg = server.aggregate(bad)
    assert [r["client"] for r in agg["rejected"]] == list(range(6))
    assert "round 1: no valid update; the global model is unchanged" in caplog.text
    assert all(torch.equal(server.global_weights[n], t) for n, t in before.items())
    assert all(torch.equal(server.server_state[n], t) for n, t in state.items())


def test_norm_bound_is_off_by_default_and_inclusive(tmp_path):
    from flexmoe.engine.validation import update_norm

    server = server_with(tmp_path, "method=fedavg")
    assert "rejected" not in server.aggregate([shifted(server, 1e3, client=0)])
    server = server_with(tmp_path, "method=fedavg")
    reply = shifted(server, 0.5, client=0)
    norm = update_norm(server.method.reply_update(reply.tensors, server.global_weights))
    assert norm == pytest.approx(0.5 * math.sqrt(24), rel=1e-6)
    server = server_with(tmp_path, "method=fedavg", f"validation.max_update_norm={norm!r}")
    agg = server.aggregate([reply])
    assert "rejected" not in agg and agg["update_norms"] == {"0": norm}  # norm = bound exactly: accepted
    server = server_with(tmp_path, "method=fedavg", f"validation.max_update_norm={norm * (1 - 1e-9)!r}")
    assert server.aggregate([reply])["rejected"][0]["client"] == 0


def test_scaffold_replies_are_checked_against_its_own_layout(tmp_path):
    server = server_with(tmp_path, "method=scaffold", "validation.max_update_norm=1")
    deltas = {n: torch.full_like(t, 0.01) for n, t in server.global_weights.items()}
    good = Reply({**{f"delta.{n}": t for n, t in deltas.items()},
                  **{f"control_delta.{n}": t for n, t in deltas.items()}}, 5, client=0)
    huge = Reply({k: t * 1000 if k.startswith("delta.") else t for k, t in good.tensors.items()}, 5, client=1)
    weights_only = shifted(server, 0.01, client=2)
    agg = server.aggregate([good, huge, weights_only])
    assert [r["client"] for r in agg["rejected"]] == [1, 2]
    assert agg["rejected"][1]["reason"].startswith("missing tensor 'control_delta.")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flex", "fcmoe", "flex+fcmoe", "scaffold", "fedyogi"])
def test_real_replies_of_every_layout_pass_validation(model_dir, tmp_path, method):
    run(model_dir, tmp_path, f"method={method}", "rounds=1", "eval.base=false", "eval.global_model=false",
        "validation.max_update_norm=1e6")
    server = next(r for r in metrics(tmp_path) if r["kind"] == "server" and r["round"] == 1)
    assert "rejected" not in server


# ---- privacy of personal experts (helpers/leaks.py finds them in sent bytes) ---------------------
@pytest.mark.parametrize("graft_train", ["lora", "full"])
def test_flex_personal_tensors_never_leave_a_client(model_dir, tmp_path, monkeypatch, graft_train):
    """Every blob the in-process engine serialises is captured; the personal state of every
    client at the time (graft experts or their LoRA, gates) is checked against them by key and by value."""
    sent: list[bytes] = []
    versions: dict[str, list[torch.Tensor]] = {}  # "<file>:<key>" -> every distinct value seen

    def snapshot_personal() -> None:
        for path in tmp_path.glob("clients/*/**/personal.safetensors"):
            for key, value in read_tensors(path).items():
                seen = versions.setdefault(f"{path.relative_to(tmp_path)}:{key}", [])
                if not any(torch.equal(value, old) for old in seen):
                    seen.append(value)

    def capturing_serialize(tensors, metadata=None):
        snapshot_personal()  # the sender's newest personal state is already on disk (pending)
        blob = serialize(tensors, metadata)
        sent.append(blob)
        return blob

    monkeypatch.setattr(local_clients, "serialize", capturing_serialize)
    run(model_dir, tmp_path, "method=flex", "rounds=2", "clients_per_round=4", "flex.federate_routers=true",
        "eval.base=false", f"flex.graft_train={graft_train}")
    snapshot_personal()
    assert len(sent) == 2 * 5  # per round: one downlink, four uplinks
    keys = {label.split(":", 1)[1] for label in versions}
    expert = "model.layers.1.mlp.graft.experts.0.down_proj." + ("weight" if graft_train == "full" else "lora_B.graft.weight")
    assert {"model.layers.0.mlp.graft.gate.weight", expert} <= keys, sorted(keys)
    assert max(len(values) for values in versions.values()) >= 3  # grafted, then trained in rounds 1 and 2
    assert keys == roles_personal_names(model_dir, keys, graft_train)  # the store holds exactly what the roles call personal
    personal = {f"{label}#{i}": value for label, values in versions.items() for i, value in enumerate(values)}
    assert leaks(personal, sent) == []
    assert leaks({label.split(":", 1)[1]: values[-1] for label, values in versions.items()}, sent) == []


def roles_personal_names(model_dir, stored: set[str], graft_train: str) -> set[str]:
    """The personal parameters FLEx's roles name on a grafted model, spelled as the personal-state
    file spells them (no PEFT prefix), plus the graft's buffers (expert ids) the file also keeps."""
    from flexmoe.engine.model import load_model
    from flexmoe.methods.build import build_method
    from flexmoe.models import graft, moe_layers, split_parameters

    from flexmoe.methods.flex.method import graft_training

    config = engine_config(model_dir, "method=flex", "flex.federate_routers=true", f"flex.graft_train={graft_train}")
    method = build_method(config)
    model, _ = load_model(config, method)
    graft(model, {layer.name: [0] for layer in moe_layers(model)}, training=graft_training(config))
    names = {name.removeprefix("base_model.model.") for name in split_parameters(model, method.roles).personal}
    buffers = {key for key in stored if key not in names and not any(
        key == name.removeprefix("base_model.model.") for name, _ in model.named_parameters())}
    assert names and all(".graft." in name for name in names)
    return names | buffers


def test_the_leak_detector_finds_a_personal_row_hidden_in_a_message():
    generator = torch.Generator().manual_seed(0)
    personal = {"layers.0.mlp.graft.experts.down_proj": torch.randn(3, 16, generator=generator),
                "layers.0.mlp.graft.gate.bias": torch.randn(1, generator=generator)}
    shared = {"layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16, generator=generator)}
    assert leaks(personal, [serialize(shared)]) == []
    disguised = dict(shared, **{"layers.0.self_attn.q_proj.lora_B.weight": torch.cat(
        [torch.randn(2, 16, generator=generator), personal["layers.0.mlp.graft.experts.down_proj"][1:2]])})
    assert leaks(personal, [serialize(disguised)]) == ["row 1 of layers.0.mlp.graft.experts.down_proj"]
    renamed = {"anything": personal["layers.0.mlp.graft.experts.down_proj"].clone()}
    assert "value layers.0.mlp.graft.experts.down_proj" in leaks(personal, [serialize(renamed)])
    assert "key layers.0.mlp.graft.experts.down_proj" in leaks(personal, [serialize(personal)])


# ---- differential privacy ------------------------------------------------------------------------
def dp_settings(z: float, clip: float = 1.0, delta: float = 1e-5):
    from flexmoe.config import PrivacyConfig

    return PrivacyConfig(noise_multiplier=z, clip_norm=clip, delta=delta)


def flat_norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def test_updates_are_clipped_to_the_clip_norm(tmp_path):
    server = server_with(tmp_path, "method=fedavg")
    method, start = server.method, server.global_weights
    big, small = shifted(server, 2.0, client=0), shifted(server, 0.01, client=1)
    assert flat_norm(method.reply_update(big.tensors, start)) > 1.5
    release, info = privacy.private_release(method, start, [big], dp_settings(0.0, clip=1.5), seed=0, round_index=1)
    assert flat_norm(method.reply_update(release.tensors, start)) == pytest.approx(1.5, rel=1e-5)
    assert info == {"dp_noise_std": 0.0, "dp_clipped": 1}
    release, info = privacy.private_release(method, start, [big, small], dp_settings(0.0, clip=1.5), 0, 1)
    clipped_big = {n: (t - start[n]) * (1.5 / flat_norm(method.reply_update(big.tensors, start)))
                   for n, t in big.tensors.items()}
    for name, value in start.items():  # uniform mean of the clipped and the untouched (small) update
        expected = value + (clipped_big[name] + 0.01) / 2
        assert torch.allclose(release.tensors[name], expected, atol=1e-6)
    assert info["dp_clipped"] == 1


def test_noise_has_the_specified_std_and_is_seeded(tmp_path):
    server = server_with(tmp_path, "method=fedavg")
    start = {"w": torch.zeros(400, 500)}  # 200k draws: the sample std is within 0.5% of the truth
    replies = [Reply({"w": torch.zeros(400, 500)}, 1, client=c) for c in range(4)]
    release, info = privacy.private_release(server.method, start, replies, dp_settings(1.2, clip=2.0), 7, 3)
    noise = release.tensors["w"].double()
    assert info["dp_noise_std"] == pytest.approx(1.2 * 2.0 / 4)
    assert float(noise.std()) == pytest.approx(0.6, rel=5e-3) and abs(float(noise.mean())) < 0.005
    again, _ = privacy.private_release(server.method, start, replies, dp_settings(1.2, clip=2.0), 7, 3)
    other, _ = privacy.private_release(server.method, start, replies, dp_settings(1.2, clip=2.0), 7, 4)
    assert torch.equal(again.tensors["w"], release.tensors["w"])
    assert not torch.equal(other.tensors["w"], release.tensors["w"])


@pytest.mark.parametrize(("z", "rounds", "per_round", "clients"), [(1.0, 5, 2, 4), (0.7, 20, 3, 10), (2.0, 1, 4, 4)])
def test_epsilon_equals_dp_accounting_called_directly(z, rounds, per_round, clients):
    import dp_accounting
    from dp_accounting import rdp

    config = load_config(None, ["method=fedavg", f"num_clients={clients}", f"clients_per_round={per_round}",
                                f"privacy.noise_multiplier={z}", "privacy.delta=1e-5"])
    accountant = rdp.RdpAccountant(orders=list(privacy.ORDERS))
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(per_round / clients, dp_accounting.GaussianDpEvent(z)), rounds))
    assert privacy.epsilon(config, rounds) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert privacy.epsilon(config, rounds + 1) > privacy.epsilon(config, rounds)


def test_privacy_needs_a_method_whose_reply_is_the_shared_weights():
    with pytest.raises(FlexmoeError, match="privacy.noise_multiplier > 0 needs a method .* method = 'scaffold'"):
        load_config(None, ["method=scaffold", "privacy.noise_multiplier=1"])


@pytest.mark.slow
def test_dp_run_reports_epsilon_and_zero_noise_changes_nothing(model_dir, tmp_path):
    base = ("method=flex", "rounds=2", "eval.base=false")
    plain = run(model_dir, tmp_path / "plain", *base)
    run(model_dir, tmp_path / "off", *base, "privacy.noise_multiplier=0", "privacy.clip_norm=0.001")
    assert metrics(tmp_path / "off") == metrics(tmp_path / "plain")
    assert "dp_epsilon" not in plain
    private = run(model_dir, tmp_path / "dp", *base, "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.05")
    config = engine_config(model_dir, *base, "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.05")
    servers = [r for r in metrics(tmp_path / "dp") if r["kind"] == "server" and r["round"] > 0]
    assert [r["dp_epsilon"] for r in servers] == [privacy.epsilon(config, 1), privacy.epsilon(config, 2)]
    assert all(r["dp_noise_std"] == pytest.approx(0.8 * 0.05 / 2) for r in servers)
    assert private["dp_epsilon"] == servers[-1]["dp_epsilon"] and private["dp_delta"] == 1e-5
    assert metrics(tmp_path / "dp") != metrics(tmp_path / "plain")
    run(model_dir, tmp_path / "dp-again", *base, "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.05")
    assert metrics(tmp_path / "dp-again") == metrics(tmp_path / "dp")
    # the global update of each round is the noised mean of updates clipped to 0.05
    initial = read_tensors(tmp_path / "dp" / "checkpoints" / "initial.safetensors")
    final = read_tensors(tmp_path / "dp" / "checkpoints" / "server.safetensors")
    update = np.sqrt(sum(float((final["global." + n] - t).double().pow(2).sum()) for n, t in initial.items()))
    numel = sum(t.numel() for t in initial.values())
    noise_norm = 0.8 * 0.05 / 2 * math.sqrt(2 * numel)  # two rounds of noise, std 0.02 per element
    assert abs(update - noise_norm) < 2 * 0.05 + 0.1 * noise_norm


def test_the_reliability_doc_names_only_tests_that_exist():
    import re

    files = {path.name: path for path in TESTS.rglob("test_*.py")}  # test file names are unique
    text = (REPO_ROOT / "docs" / "reliability.md").read_text()
    named, current = [], None
    for where, file, test in re.findall(r"`(tests/(?:\w+/)?)?(test_\w+\.py)?::(test_\w+)", text):
        if where:  # a path the doc spells out is the file's real one
            assert (REPO_ROOT / where / file).is_file(), f"{where}{file}"
        current = file or current
        named.append((current, test))
    assert len(named) > 30
    for file, test in named:
        assert re.search(rf"^def {test}\(", files[file].read_text(), flags=re.M), f"{file}::{test}"
