"""Device and dtype: `runtime.device` / `runtime.base_dtype` resolve as documented, a CUDA device
on a machine without one is a one-line error, and a bf16 base on the CPU trains end to end with
fp32 master weights for everything trainable (FLEx and FedAvg, 2 rounds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexmoe.errors import FlexmoeError
from flexmoe.models.device import autocast, compute_dtype, fp32_master, resolve_device, resolve_dtype

from helpers.engine import engine_config

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


def test_auto_resolves_to_the_cpu_and_fp32_without_a_gpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        assert resolve_dtype("auto", resolve_device("auto")) == torch.bfloat16
    else:
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_one_line_error(name):
    with pytest.raises(FlexmoeError) as err:
        resolve_device(name)
    assert "no CUDA device" in str(err.value) and name in str(err.value) and "\n" not in str(err.value)


@NO_CUDA
def test_cli_refuses_cuda_in_one_line(capsys):
    from flexmoe.cli import main

    assert main(["run", "--set", "runtime.device=cuda", "--output-dir", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "runtime.device = 'cuda'" in err and "no CUDA device" in err


def test_config_rejects_an_unknown_device():
    from flexmoe.config import load_config

    with pytest.raises(FlexmoeError, match="runtime.device"):
        load_config(None, ["runtime.device=tpu"])
    assert load_config(None, ["runtime.device=cuda:3"]).runtime.device == "cuda:3"


def test_fp32_master_router_returns_the_base_dtype():
    router = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    fp32_master(router)
    fp32_master(router)  # idempotent: one pair of hooks
    assert router.weight.dtype == torch.float32 and len(router._forward_pre_hooks) == 1
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = router(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x.float() @ router.weight.T, rtol=1e-2, atol=1e-2)


def test_autocast_is_a_null_context_in_fp32():
    model = torch.nn.Sequential(torch.nn.Embedding(4, 4))
    model.get_input_embeddings = lambda: model[0]
    assert compute_dtype(model) == torch.float32 and compute_dtype(model, "bf16") == torch.bfloat16
    with autocast(model):
        assert not torch.is_autocast_enabled("cpu")
    model.to(torch.bfloat16)
    with autocast(model):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_graft_on_a_bf16_base_is_fp32_and_closed_gate_keeps_the_logits():
    from helpers.tiny import tiny_model, token_batches

    from flexmoe.models import graft, moe_layers

    model = tiny_model("qwen2_moe").to(torch.bfloat16)
    ids = token_batches()[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    graft(model, {layer.name: [0] for layer in moe_layers(model)}, gate_init_bias=-1e4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.dtype == torch.bfloat16 and torch.equal(before, after)


def test_full_scope_on_a_half_base_is_refused():
    from helpers.tiny import tiny_model

    from flexmoe.models import add_lora

    with pytest.raises(FlexmoeError, match="base_dtype=fp32"):
        add_lora(tiny_model("qwen2_moe").to(torch.bfloat16), scope="full")


def _params_after_steps(model_dir, *overrides):
    from flexmoe.clients import make_client, partition_data
    from flexmoe.engine.model import load_model
    from flexmoe.methods.build import build_method
    from flexmoe.train import local_train

    config = engine_config(model_dir, *overrides)
    method = build_method(config)
    model, tokenizer = load_model(config, method)
    client = make_client(config, partition_data(config)[0], tokenizer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    from flexmoe.data import collate

    checkpointing = []
    result = local_train(model, params, client.features, lambda f: collate(f, tokenizer.pad_token_id),
                         config.train, config.train.lr, seed=1,
                         on_step=lambda *_: checkpointing.append(any(getattr(m, "gradient_checkpointing", False)
                                                                     for m in model.modules())))
    return {n: p.detach().clone() for n, p in params.items()}, result, checkpointing


def test_gradient_checkpointing_trains_the_same_weights(model_dir):
    plain, plain_result, off = _params_after_steps(model_dir, "method=fedavg")
    checkpointed, result, on = _params_after_steps(model_dir, "method=fedavg", "train.gradient_checkpointing=true")
    assert on == [True, True] and off == [False, False]
    assert result.loss == pytest.approx(plain_result.loss, rel=1e-5)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flex", "fedavg"])
def test_bf16_base_on_the_cpu_runs_two_rounds(model_dir, tmp_path, method):
    from flexmoe.engine.model import load_model
    from flexmoe.engine.simulation import Simulation
    from flexmoe.methods.build import build_method

    overrides = [f"method={method}", "runtime.device=cpu", "runtime.base_dtype=bf16"]
    if method == "flex":
        overrides.append("flex.federate_routers=true")
    config = engine_config(model_dir, *overrides)
    summary = Simulation(config, tmp_path).run()
    assert summary["rounds_completed"] == 2 and 0.0 <= summary["rouge_l_avg"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in train)
    # what the run trained is fp32 (sent and kept), the base it trained on bf16
    from flexmoe.files import load_checked

    sent = load_checked(Path(tmp_path) / "checkpoints" / "initial.safetensors")[0]
    assert sent and all(t.dtype == torch.float32 for t in sent.values())
    model, _ = load_model(config, build_method(config))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # `flexmoe eval` rebuilds the bf16 model (on the device asked for) and scores what the run scored
    from flexmoe.commands.eval import evaluate_run

    again = evaluate_run(tmp_path, [0, 1], device="cpu")["clients"]
    last = {r["client"]: (r["rouge_l"], r["test_loss"]) for r in records if r["kind"] == "eval" and r["round"] == 2}
    assert {r["client"]: (r["rouge_l"], r["test_loss"]) for r in again} == {c: last[c] for c in (0, 1)}
    if method == "flex":
        personal = load_checked(next((tmp_path / "clients").rglob("personal.safetensors")))[0]
        assert all(t.dtype in (torch.float32, torch.int64) for t in personal.values())
        assert any(".gate." in name for name in sent)  # the federated routers travel, in fp32


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantised_base_trains_flex_on_the_cpu(wide_model_dir, tmp_path, quantize):
    """int8: bitsandbytes quantises the nn.Linear modules (attention here) and the fused experts stay
    bf16. nf4: the fused experts are quantised (bitsandbytes' parametrisation), nn.Linear stays bf16
    on the CPU. Either way a FLEx round trains."""
    pytest.importorskip("bitsandbytes")
    from flexmoe.engine.model import load_model
    from flexmoe.engine.simulation import Simulation
    from flexmoe.methods.build import build_method
    from flexmoe.models import moe_layers
    from flexmoe.models.quantize import is_quantized

    config = engine_config(wide_model_dir, "runtime.device=cpu", "runtime.base_dtype=bf16", f"runtime.quantize={quantize}",
                         "rounds=1")
    model, _ = load_model(config, build_method(config))
    linear = {type(m).__name__ for m in model.modules()} & {"Linear4bit", "Linear8bitLt"}
    experts = [is_quantized(layer.experts, name) for layer in moe_layers(model) for name in ("gate_up_proj", "down_proj")]
    assert (bool(linear), all(experts)) == ((True, False) if quantize == "int8" else (False, True))
    summary = Simulation(config, tmp_path).run()
    assert summary["rounds_completed"] == 1 and summary["train_loss"] > 0
    # that the round trains every sampled client's graft: tests/models/test_quantized_graft_trains.py


def test_nf4_experts_stay_close_to_the_bf16_base():
    """The shipped tiny base (trained weights) with 4-bit experts against itself in bf16, on the same
    tokens. Exact: the quantised model equals the bf16 model whose experts are replaced by
    bitsandbytes' own quantise-dequantise round trip (the wiring is right). Close: NF4 has a
    relative weight error of ~8-10% per block of 64 (measured below as `weight_error`); the logits
    sum many such weights with independent errors, so their relative error must come out below the
    weights' own (measured: 0.03 vs 0.09), and greedy next tokens must mostly agree (measured 98%;
    asserted >= 90%). A wrong route (experts left unquantised, or mangled) fails one of the three."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from flexmoe.models import load_base, moe_layers
    from flexmoe.models.quantize import BLOCKSIZE

    ids = torch.randint(3, 6000, (2, 48), generator=torch.Generator().manual_seed(0))
    base, _ = load_base("tiny", dtype=torch.bfloat16, device="cpu")
    quantized, _ = load_base("tiny", dtype=torch.bfloat16, device="cpu", quantize="nf4")
    with torch.no_grad():
        reference = base(ids).logits.float()
        out = quantized(ids).logits.float()
        errors = []
        for layer in moe_layers(base):
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.experts, name)
                packed, state = bnbf.quantize_4bit(weight.data, quant_type="nf4", blocksize=BLOCKSIZE)
                round_trip = bnbf.dequantize_4bit(packed, state)
                errors.append(((round_trip.float() - weight.float()).norm() / weight.float().norm()).item())
                weight.data.copy_(round_trip)
        round_tripped = base(ids).logits.float()
    assert torch.equal(out, round_tripped)
    weight_error = max(errors)
    logit_error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < logit_error < weight_error
    assert (out.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_nf4_refuses_a_method_that_trains_the_experts(model_dir):
    pytest.importorskip("bitsandbytes")
    from flexmoe.engine.model import load_model
    from flexmoe.methods.build import build_method

    config = engine_config(model_dir, "runtime.device=cpu", "runtime.base_dtype=bf16", "runtime.quantize=nf4",
                         "method=fedavg", "lora.scope=attention+experts", "lora.dropout=0")
    with pytest.raises(FlexmoeError, match="trains them"):
        load_model(config, build_method(config))


def test_nf4_plan_counts_the_quantised_experts():
    """The plan's frozen bytes and step on a nf4 base against the real ones, counted the same way."""
    pytest.importorskip("bitsandbytes")
    from flexmoe.config import load_config
    from flexmoe.engine.model import load_model
    from flexmoe.methods.build import build_method
    from flexmoe.models import graft, moe_layers
    from flexmoe.models.quantize import stored_bytes
    from flexmoe.models.roles import apply_roles
    from flexmoe.cost.plan import plan, step_memory

    config = load_config(None, ["runtime.device=cpu", "runtime.base_dtype=bf16", "runtime.quantize=nf4",
                                "flex.graft_train=full"])  # the graft below is grafted in full
    planned = plan(config, "tiny", batch=2, length=64)
    method = build_method(config)
    model, _ = load_model(config, method)
    graft(model, {layer.name: [0] for layer in moe_layers(model)})
    apply_roles(model, method.roles)
    real = step_memory(model, 2, 64, 2 * 63, planned.memory.optimizer_state)
    absmax = sum(stored_bytes(layer.experts) for layer in moe_layers(model)) - sum(
        p.nbytes for layer in moe_layers(model) for p in layer.experts.parameters())
    assert planned.memory.weights_frozen == real.weights_frozen + absmax
    assert planned.memory.peak == pytest.approx(real.peak + absmax, rel=0.2)
    unquantised = plan(load_config(None, ["runtime.device=cpu", "runtime.base_dtype=bf16", "flex.graft_train=full"]),
                       "tiny", batch=2, length=64)
    assert planned.memory.weights_frozen < 0.6 * unquantised.memory.weights_frozen


def test_quantize_needs_a_half_precision_base():
    from flexmoe.models.device import quantization_config

    with pytest.raises(FlexmoeError, match="base_dtype"):
        quantization_config("nf4", torch.float32)
    assert quantization_config("nf4", torch.bfloat16, torch.device("cpu")) is None  # experts only, after loading
