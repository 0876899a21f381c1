"""Real widths at cut depth (`flexmoe.shapes`): every shipped shape keeps its widths and its family's
quirks when cut, and one small shape runs end to end (run, graft, generate, export) on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from flexmoe.models import moe_layers
from flexmoe.cost.plan import meta_base
from flexmoe.shapes import shape_config, shape_fields, shape_names


@pytest.mark.parametrize("name", shape_names())
def test_cut_shapes_keep_their_widths(name):
    full = shape_fields(name)
    config = shape_config(name, layers=2, vocab_size=6144)
    layers = moe_layers(meta_base(config, torch.bfloat16))
    assert config.num_hidden_layers == 2 and config.vocab_size == 6144 and config.hidden_size == full["hidden_size"]
    expert_width = full.get("moe_intermediate_size", full["intermediate_size"])
    experts = full.get("num_experts") or full.get("n_routed_experts") or full.get("num_local_experts")
    assert layers and all((layer.num_experts, layer.intermediate_size) == (experts, expert_width) for layer in layers)
    if "first_k_dense_replace" in full:  # DeepSeek-V2: its dense first layer and MLA stay
        assert len(layers) == 1 and layers[0].index == 1 and config.kv_lora_rank == full["kv_lora_rank"]


@pytest.mark.slow
def test_a_real_width_shape_runs_end_to_end(tmp_path):
    """OLMoE-1B-7B's widths (hidden 2048, 64 experts of 1024, top-8) at 1 layer, bf16, through the CLI."""
    from flexmoe.cli import main
    from flexmoe.shapes import random_checkpoint

    model = random_checkpoint("olmoe-1b-7b", tmp_path / "model", layers=1)
    sets = [a for s in ("method=flex", "num_clients=2", "clients_per_round=2", "rounds=1", "runtime.base_dtype=bf16",
                        "runtime.threads=1", "train.batch_size=2", "train.max_length=32", "train.local_steps=1",
                        "data.max_train_per_client=4", "flex.calibration_examples=2", "eval.max_test_examples=1",
                        "eval.max_new_tokens=2", "eval.knowledge=false", f"model={model}") for a in ("--set", s)]
    run = tmp_path / "run"
    assert main(["run", *sets, "--output-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    # the graft's LoRA (rank 32 on gate/up/down: 32 x (2048 + 1024) fp32 each) and gate: not the copy's 25 MB
    lora_bytes = 3 * 32 * (2048 + 1024) * 4
    assert summary["rounds_completed"] == 1
    assert lora_bytes < summary["personal_bytes_per_client"] < lora_bytes + 64 * 1024 < 3 * 2048 * 1024 * 4
    assert main(["graft", "--model", str(model), "--max-examples", "2", "--max-length", "32", "--dtype", "bfloat16",
                 "--device", "cpu", "--json"]) == 0
    assert main(["generate", "--run", str(run), "--client", "0", "--prompt", "Name a colour.",
                 "--max-new-tokens", "2"]) == 0
    assert main(["export", "--run", str(run), "--client", "0", "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "config.json").is_file()  # the export is itself a model directory
