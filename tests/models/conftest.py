"""The models tests' fixtures: a fresh tiny model of every supported family (function-scoped:
tests graft into it and add LoRA to it in place), token batches, and a wide tiny model folder."""

from __future__ import annotations

import pytest

from helpers.engine import build_tokenizer
from helpers.tiny import FAMILY_NAMES, tiny_model, token_batches


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture
def batches():
    return token_batches()


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory) -> str:
    """The engine tests' model at real-model-like widths (multiples of 128): bitsandbytes' CPU
    4-bit kernels work in blocks and refuse the 32-wide tiny model's layers."""
    path = tmp_path_factory.mktemp("wide-qwen2moe")
    vocab = build_tokenizer(path)
    tiny_model("qwen2_moe", vocab_size=vocab, max_position_embeddings=128, hidden_size=256,
               num_key_value_heads=4, moe_intermediate_size=128, intermediate_size=256,
               shared_expert_intermediate_size=256).save_pretrained(path)
    return str(path)
