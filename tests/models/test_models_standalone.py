"""A grafted model written as a standalone Hugging Face directory (flexmoe.models.standalone), for
every supported family: plain transformers (trust_remote_code) and flexmoe's own loader give
exactly the grafted model's logits; without trust_remote_code transformers refuses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.tiny import FAMILY_NAMES, save_tokenizer, tiny_model, token_batches


def grafted_model(family: str, k: int):
    """A tiny model grafted with k experts per layer, its gates opened and perturbed so the graft
    visibly changes the output (a closed gate would hide a missing graft)."""
    from flexmoe.models import graft, grafts, select_experts

    model = tiny_model(family)
    graft(model, select_experts(model, token_batches(), k=k), gate_init_bias=1.0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in grafts(model).values():
            module.gate.weight.copy_(0.3 * torch.randn(module.gate.weight.shape, generator=generator))
            for mlp in module.experts:
                mlp.down_proj.weight.mul_(3.0)
    return model.eval()


def same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding. Two instances with identical weights (same values and strides)
    can differ in the last bit on some CPUs (measured 6e-8 on an AMD EPYC: the BLAS kernel's path
    depends on where the weights lie in memory); a missing graft moves them by > 1e-2 (asserted
    below; measured 3.7-6.3 over the families)."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plain_transformers_loads_the_grafted_model_of_every_family(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from flexmoe.models import current_selection, grafts_disabled
    from flexmoe.models.standalone import load_grafted, save_grafted

    k = 2 if family in ("qwen2_moe", "deepseek_v3") else 1  # k > 1 adds the graft's router (sigmoid scores on v3)
    model = grafted_model(family, k)
    ids = token_batches(seed=3)[0]
    expected = logits(model, ids)
    with grafts_disabled(model):
        base = logits(model, ids)
    assert (expected - base).abs().max() > 1e-2  # the graft matters: a load without it would show
    out = tmp_path / "export"
    save_grafted(model, tokenizer, out, torch.float32)

    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(loaded).__name__.startswith("Flexmoe") and isinstance(loaded, type(model))
    same_logits(logits(loaded, ids), expected)
    own, _ = load_grafted(out, torch.float32, torch.device("cpu"))
    assert isinstance(own, type(model)) and current_selection(own) == current_selection(model)
    same_logits(logits(own, ids), expected)
    with pytest.raises(ValueError, match="custom code"):  # never the base without its graft
        AutoModelForCausalLM.from_pretrained(out)


def test_the_export_ships_the_training_code_and_its_spec(tokenizer, tmp_path):
    from flexmoe.models import graft_module
    from flexmoe.models.standalone import GRAFT_FILE, SPEC_KEY, save_grafted

    model = grafted_model("qwen2_moe", 2)
    save_grafted(model, tokenizer, tmp_path / "export", torch.float32)
    assert (tmp_path / "export" / GRAFT_FILE).read_text() == Path(graft_module.__file__).read_text()
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "flexmoe_qwen2_moe"
    assert config["architectures"] == ["FlexmoeQwen2MoeForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_flexmoe.FlexmoeQwen2MoeForCausalLM"
    spec = config[SPEC_KEY]
    assert spec["class"] == "ExpertGraft" and list(spec["layers"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert spec["layers"]["model.layers.0.mlp"] == {
        "hidden_size": 32, "intermediate_size": 16, "k": 2, "gate": "sigmoid", "hidden_act": "silu",
        "score": "softmax", "output_scale": 1.0, "clone_input": False}


def test_generate_pipeline_and_save_pretrained_round_trip(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, pipeline

    from flexmoe.models.standalone import save_grafted

    model = grafted_model("qwen3_moe", 1)
    out = tmp_path / "export"
    save_grafted(model, tokenizer, out, torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    prompt = tokenizer("w5 w6 w7", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(**prompt, max_new_tokens=6, do_sample=False), expected)
    generator = pipeline("text-generation", model=str(out), trust_remote_code=True, dtype=torch.float32)
    text = generator("w5 w6 w7", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    new_tokens = expected[0, prompt["input_ids"].shape[1]:]
    assert text == "w5 w6 w7" + tokenizer.decode(new_tokens, skip_special_tokens=True)  # the prompt, then the same tokens

    again = tmp_path / "again"
    loaded.save_pretrained(again)  # custom code travels with it
    reloaded = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True, dtype=torch.float32).eval()
    ids = token_batches(seed=4)[0]
    same_logits(logits(reloaded, ids), logits(model, ids))


def test_a_half_precision_export_keeps_the_graft_in_fp32(tokenizer, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from flexmoe.models.standalone import load_grafted, save_grafted

    model = grafted_model("olmoe", 1)
    out = tmp_path / "export"
    save_grafted(model, tokenizer, out, torch.bfloat16)
    with safe_open(out / "model.safetensors", "pt") as handle:
        dtypes = {name: str(handle.get_slice(name).get_dtype()) for name in handle.keys()}
    assert {d for n, d in dtypes.items() if ".graft." in n} == {"F32", "I64"}  # weights, expert ids
    assert {d for n, d in dtypes.items() if ".graft." not in n} == {"BF16"}
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()  # dtype "auto": the stored one
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in loaded.named_parameters() if ".graft." in n} == {torch.float32}
    assert loaded.model.layers[0].mlp.graft.expert_ids.dtype == torch.long
    own, _ = load_grafted(out, torch.bfloat16, torch.device("cpu"))
    ids = token_batches(seed=3)[0]
    same_logits(logits(loaded, ids), logits(own, ids))
