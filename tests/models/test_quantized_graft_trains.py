"""A FLEx round on a quantised base (`runtime.quantize = int8 | nf4`, bitsandbytes on the CPU) trains
the graft and gate of every client it samples, and only those.

"The graft does not change after an int8 round" was a misreading: the check looked at client 0,
which the round (4 clients, 2 sampled, seed 3) never trained, so its graft was still the copied
expert. Here the clients the round trained are read from metrics.jsonl, and each client's graft is
compared with the expert it was copied from, as the loaded base holds it (bf16 under int8, whose
experts bitsandbytes leaves unquantised; dequantised under nf4).
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers.engine import engine_config



@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_a_quantised_round_trains_the_graft_of_every_sampled_client(wide_model_dir, tmp_path, quantize):
    pytest.importorskip("bitsandbytes")
    from flexmoe.engine.model import load_model
    from flexmoe.engine.simulation import Simulation
    from flexmoe.files import load_checked
    from flexmoe.methods.build import build_method
    from flexmoe.models import moe_layers

    config = engine_config(wide_model_dir, "runtime.device=cpu", "runtime.base_dtype=bf16", f"runtime.quantize={quantize}",
                         "rounds=1", "num_clients=3", "clients_per_round=2", "train.local_steps=1",
                         "flex.graft_train=full")  # every weight of the copy trains: compared with the expert below
    GATE_INIT_BIAS = config.flex.gate_init_bias
    Simulation(config, tmp_path).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = {r["client"] for r in records if r.get("kind") == "train"}
    assert len(trained) == 2
    model, _ = load_model(config, build_method(config))
    layers = moe_layers(model)
    for client in range(3):
        tensors, meta = load_checked(tmp_path / "clients" / str(client) / "personal.safetensors")
        selection = json.loads(meta["selection"])
        for layer in layers:
            (expert,) = selection[layer.name]
            graft = tensors[f"{layer.name}.graft.experts.0.down_proj.weight"]
            copied = layer.down_proj[expert].float()
            bias = float(tensors[f"{layer.name}.graft.gate.bias"])
            if client in trained:
                assert not torch.equal(graft, copied) and bias != GATE_INIT_BIAS, (client, layer.name)
            else:  # grafted before round 1, never trained: still the copy and the closed gate
                assert torch.equal(graft, copied) and bias == GATE_INIT_BIAS, (client, layer.name)
