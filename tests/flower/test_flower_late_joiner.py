"""A SuperNode that first appears after the run began: a loopback deployment (`scripts/flower-deploy.sh`)
starts with SuperNode 0 only (`min-clients = 1`); SuperNode 1 is started while round 1 trains, so
round 1 goes on without client 1, and client 1 is grafted at its first round (2) and trains from
then on. The reference is the in-process engine with client 1 failing its round-1 training: every
record from round 1 on must be the same, and the late client's graft selection that of the
in-process client, grafted before round 1 on the untouched base."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from helpers.flower import (
    BIN, Deployment, client_dir, clientapps_of, committed_rounds, free_base_port, node_ids_in_log, read_metrics,
    stop_process, wait_until, without_bytes,
)

pytestmark = [pytest.mark.flower, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flwr", path=str(BIN)) is None, reason="flwr is not installed")]
LATE = 1  # the client whose SuperNode starts late


@pytest.fixture(scope="module")
def late_config(run_config) -> Path:
    """3 rounds, evaluation after the last one only (round 1 then goes straight to round 2)."""
    path = run_config.parent / "late.toml"
    path.write_text(run_config.read_text().replace("rounds = 2", "rounds = 3").replace("[eval]\n", "[eval]\nevery = 0\n"))
    return path


def in_process_with_a_failed_round_1(config_path: Path, run_dir: Path, monkeypatch) -> list[dict]:
    """The in-process engine on the same config, client LATE's round-1 training raising: what the
    federation computes when that client is absent from round 1."""
    from flexmoe.config import load_config
    from flexmoe.engine.simulation import InProcess, Simulation

    honest = InProcess._train_client

    def absent_in_round_1(self, client, round_index, down_blob):
        if client.client_id == LATE and round_index == 1:
            raise RuntimeError("absent in round 1")
        return honest(self, client, round_index, down_blob)

    with monkeypatch.context() as patch:
        patch.setattr(InProcess, "_train_client", absent_in_round_1)
        Simulation(load_config(config_path), run_dir).run()
    return read_metrics(run_dir)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def same_without_errors(records: list[dict]) -> list[dict]:
    """Records as both engines must agree on them: without bytes, timings and failure messages."""
    return [{k: v for k, v in r.items() if k != "error"} for r in without_bytes(records)]


def test_a_supernode_that_appears_after_round_0_is_grafted_at_its_first_round(late_config, tmp_path, monkeypatch):
    expected = in_process_with_a_failed_round_1(late_config, tmp_path / "in-process", monkeypatch)
    deployment = Deployment(tmp_path / "deploy")
    run_dir = tmp_path / "run"
    try:
        deployment.env["FLEXMOE_START_NODES"] = "1"
        port = free_base_port()
        deployment.deploy("start", str(deployment.work), "2", str(port))
        wait_until(lambda: listening(port), 120, "the SuperLink")
        process = deployment.submit(tmp_path / "flwr.log", f"min-clients=1 config='{late_config}' output-dir='{run_dir}'",
                                    round_timeout=600.0)
        try:
            wait_until(lambda: 0 in committed_rounds(run_dir), 300, "round 0")
            wait_until(lambda: clientapps_of(deployment.pid("supernode-0")), 120, "SuperNode 0's round-1 ClientApp")
            deployment.deploy("node", str(deployment.work), str(LATE))
            late_log = deployment.work / f"node-{LATE}" / "supernode.log"
            wait_until(lambda: late_log.exists() and node_ids_in_log(late_log), 120, "the late SuperNode's node id")
            # the premise: the late node connected while round 1 was in progress, after its clients were chosen
            assert committed_rounds(run_dir) == [0]
            state = client_dir(deployment.state(LATE), run_dir, LATE)
            wait_until(lambda: 1 in committed_rounds(run_dir), 600, "round 1")
            before_join = (run_dir / "metrics.jsonl").read_text()
            assert not (state / "selection.json").exists()  # nothing grafted before its first round
            wait_until(lambda: 2 in committed_rounds(run_dir), 600, "round 2")
            selection_after_join = (state / "selection.json").read_bytes(), (state / "selection.json").stat().st_mtime_ns
            assert process.wait(timeout=900) == 0, (tmp_path / "flwr.log").read_text()[-4000:]
        finally:
            stop_process(process)
    finally:
        deployment.stop()
    records = read_metrics(run_dir)
    log = (tmp_path / "flwr.log").read_text()
    # round 0: only client 0 was there (base evaluation, grafting); round 1 went on without client 1
    assert [r.get("client") for r in records if r["round"] == 0 and r["kind"] == "eval"] == [0]
    assert [(r["round"], r["client"]) for r in records if r["kind"] == "failure"] == [(1, LATE)]
    assert "no SuperNode of this client is online" in next(r["error"] for r in records if r["kind"] == "failure")
    # it is counted in every round from its first: trained, aggregated (its update norm), evaluated
    assert [(r["round"], r["client"]) for r in records if r["kind"] == "train"] == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    servers = {r["round"]: r for r in records if r["kind"] == "server"}
    assert [sorted(servers[n]["update_norms"]) for n in (1, 2, 3)] == [["0"], ["0", "1"], ["0", "1"]]
    assert servers[1]["failed"] == [LATE] and "failed" not in servers[2] and "failed" not in servers[3]
    assert [r["client"] for r in records if r["kind"] == "eval" and r["round"] == 3] == [0, 1]
    assert f"client {LATE}" in log and "failed" in log
    # earlier rounds are as they were when it joined (nothing rewritten), and every record from round 1 on is
    # that of the in-process federation without client 1 in round 1: the same aggregates, the same training
    assert (run_dir / "metrics.jsonl").read_text().startswith(before_join)
    assert same_without_errors([r for r in records if r["round"] >= 1]) == \
        same_without_errors([r for r in expected if r["round"] >= 1])
    # grafted once, at its first round, on the untouched base: the in-process client's selection (made
    # before round 1), kept as it was through round 3; its personal state trained on through round 3
    state = client_dir(deployment.state(LATE), run_dir, LATE)
    selection = json.loads((state / "selection.json").read_text())
    assert selection == json.loads((tmp_path / "in-process" / "clients" / str(LATE) / "selection.json").read_text())
    assert ((state / "selection.json").read_bytes(), (state / "selection.json").stat().st_mtime_ns) == \
        selection_after_join
    assert (state / "personal.safetensors").is_file() and not (state / "pending").exists()
    assert json.loads((run_dir / "summary.json").read_text())["rounds_completed"] == 3 and (run_dir / "report.md").is_file()
    # the report's client table lists it, as the in-process run lists it
    assert json.loads((run_dir / "clients.json").read_text()) == \
        json.loads((tmp_path / "in-process" / "clients.json").read_text())
