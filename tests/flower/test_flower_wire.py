"""Compressed messages in the Flower engine: a `flwr run . local` simulation with int8 messages and
error feedback reproduces the in-process engine's run with the same settings, record for record."""

from __future__ import annotations

import subprocess

import pytest
from safetensors import safe_open

from helpers.flower import BIN, ROOT, flower_env, processes_mentioning, read_metrics, stop, without_bytes

pytestmark = [pytest.mark.flower, pytest.mark.slow]
WIRE = "wire.quantize=int8;wire.error_feedback=true"


def test_int8_messages_in_flower_match_the_in_process_engine(run_config, tmp_path):
    from flexmoe.config import load_config
    from flexmoe.engine.simulation import Simulation

    Simulation(load_config(run_config, WIRE.split(";")), tmp_path / "inproc").run()
    home = tmp_path / "flwr-home"
    try:
        result = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "local", "--stream", "--federation-config",
             "num-supernodes=2 client-resources-num-cpus=1",
             "--run-config", f"config='{run_config}' output-dir='{tmp_path / 'flower'}' set='{WIRE}'"],
            cwd=ROOT, env=flower_env(home), capture_output=True, text=True, timeout=420,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:  # `flwr run . local` leaves a background SuperLink running: stop it (and its children)
        stop(processes_mentioning(str(home)))
        assert not processes_mentioning(str(home))
    flower, in_process = read_metrics(tmp_path / "flower"), read_metrics(tmp_path / "inproc")
    assert without_bytes(flower) == without_bytes(in_process)
    train = [r for r in flower if r["kind"] == "train"]
    assert train and all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in train)
    with safe_open(str(tmp_path / "flower" / "clients" / "0" / "state.safetensors"), "pt") as handle:
        assert any(k.startswith("wire_residual.") for k in handle.keys())  # error feedback kept on the client
