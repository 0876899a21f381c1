"""The shipped tiny base (src/flexmoe/assets/tiny): loads offline, is a sparse qwen2_moe, generates, knows its corpus."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from flexmoe.data import builtin_corpus
from flexmoe.eval.knowledge import heldout_loss
from flexmoe.models.routing import RoutingCounter
from flexmoe.models import load_base, moe_layers, tiny_path

SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md")


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


def test_ships_a_complete_small_model_directory():
    directory = tiny_path()
    for name in SHIPPED_FILES:
        assert (directory / name).is_file(), name
    assert (directory / "model.safetensors").stat().st_size < 40e6
    assert not (directory / "checkpoint.pt").exists()


def test_loads_offline_in_seconds(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    started = time.time()
    model, tokenizer = load_base("tiny")
    assert time.time() - started < 30  # ~1 s alone; generous for a loaded CI machine
    assert model.dtype == torch.float32 and not model.training
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # prompts start with bos, as every pretraining document did
    assert tokenizer("dog (noun)")["input_ids"] == [1] + tokenizer("dog (noun)", add_special_tokens=False)["input_ids"]


def test_is_a_qwen2_moe_with_every_layer_sparse(tiny):
    model, _ = tiny
    config = model.config
    assert config.model_type == "qwen2_moe"
    layers = moe_layers(model)
    assert [layer.index for layer in layers] == list(range(config.num_hidden_layers))
    for layer in layers:
        assert layer.num_experts == config.num_experts >= 8 and layer.top_k == 2
        assert layer.shared_expert is not None and layer.block.shared_expert_gate is not None


def test_config_matches_the_card():
    config = json.loads((tiny_path() / "config.json").read_text())
    card = (tiny_path() / "README.md").read_text()
    assert f"| layers | {config['num_hidden_layers']}, every one sparse" in card
    assert f"{config['num_experts']}, top-{config['num_experts_per_tok']}" in card


def test_generates_greedily_and_deterministically(tiny):
    model, tokenizer = tiny
    prompt = torch.tensor([[tokenizer.bos_token_id] + tokenizer("dog (noun, animal):", add_special_tokens=False)["input_ids"]])
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    first = model.generate(prompt, **kwargs)
    assert first.shape[1] > prompt.shape[1]
    assert torch.equal(first, model.generate(prompt, **kwargs))
    text = tokenizer.decode(first[0, prompt.shape[1]:], skip_special_tokens=True)
    assert sum(ch.isalpha() for ch in text) >= 5  # words, not byte noise


@pytest.mark.slow
def test_heldout_loss_is_far_below_chance(tiny):
    model, tokenizer = tiny
    texts = builtin_corpus("heldout")[:150]
    loss = heldout_loss(model, tokenizer, texts, max_length=128, batch_size=32)
    assert loss < 0.5 * math.log(len(tokenizer))  # ln(vocab) is the loss of a uniform guess


def test_routing_is_not_uniform_on_the_corpus(tiny):
    model, tokenizer = tiny
    ids = tokenizer(" ".join(builtin_corpus("heldout")[:40]), add_special_tokens=False)["input_ids"][:400]
    with RoutingCounter(model) as routing:
        routing.observe(torch.tensor([ids]))
    for name, layer in routing.summary().items():
        assert layer["tokens"] == len(ids)
        assert layer["entropy"] < layer["max_entropy"] - 1e-3, name  # some experts busier than others
        assert min(layer["counts"]) >= 0 and sum(layer["counts"]) == 2 * len(ids)
