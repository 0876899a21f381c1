"""load_base: local Hugging Face directories only; dense models and bad paths are refused."""

from __future__ import annotations

import pytest
import torch

from flexmoe.errors import FlexmoeError
from flexmoe.models import load_base, moe_layers
from flexmoe.models import load as load_module

from helpers.tiny import VOCAB, save_tokenizer, tiny_model


def test_loads_a_local_moe_directory(tmp_path):
    original = tiny_model("qwen3_moe")
    original.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    model, tokenizer = load_base(tmp_path)
    assert not model.training and len(moe_layers(model)) == 2
    assert tokenizer.pad_token_id is not None  # filled from eos for batching
    ids = torch.tensor([tokenizer("w5 w6 w7")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    bf16, _ = load_base(tmp_path, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_dense_directory_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(FlexmoeError, match=rf"'{tmp_path}' holds a model_type 'llama' model, not a supported"):
        load_base(tmp_path)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(FlexmoeError, match=rf"model directory '{tmp_path}/nowhere' does not exist"):
        load_base(tmp_path / "nowhere")
    with pytest.raises(FlexmoeError, match="is not a Hugging Face model directory"):
        load_base(tmp_path)


def test_directory_without_tokenizer_is_refused(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(FlexmoeError, match=rf"cannot load the tokenizer from '{tmp_path}'"):
        load_base(tmp_path)


def test_directory_without_weights_is_refused(tmp_path):
    tiny_model("mixtral").config.save_pretrained(tmp_path)
    with pytest.raises(FlexmoeError, match=rf"cannot load model weights from '{tmp_path}'"):
        load_base(tmp_path)


def test_missing_tiny_asset_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(load_module, "tiny_path", lambda: tmp_path / "tiny")
    with pytest.raises(FlexmoeError, match="the shipped tiny model is missing"):
        load_base("tiny")


@pytest.mark.skipif(not (load_module.tiny_path() / "config.json").is_file(), reason="the tiny asset is not built yet")
def test_shipped_tiny_model_loads():
    model, tokenizer = load_base("tiny")
    assert moe_layers(model)
    assert tokenizer("hello")["input_ids"]


def test_unknown_device_is_refused(tiny_model_dir):
    with pytest.raises(FlexmoeError, match="unknown device 'gpu0'"):
        load_base(tiny_model_dir, device="gpu0")
