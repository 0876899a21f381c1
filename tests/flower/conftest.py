"""The Flower tests' run: the session's tiny random qwen2_moe, the synthetic data and a FLEx run
config of 2 rounds and 2 clients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.engine import synthetic_examples

FLOWER_RUN_CONFIG = """\
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
def run_config(tmp_path_factory, saved_tiny_model) -> Path:
    """The session's tiny random qwen2_moe, a data file and a FLEx run config in a temp dir."""
    root = tmp_path_factory.mktemp("flower")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(e.__dict__) + "\n" for e in synthetic_examples()))
    path = root / "run.toml"
    path.write_text(FLOWER_RUN_CONFIG.format(model=saved_tiny_model, data=data))
    return path
