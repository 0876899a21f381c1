"""The shared local training loop: response-only loss, accumulation, method hooks, schedule,
optimizer state persistence."""

from __future__ import annotations

import math

import pytest
import torch

from flexmoe.config import load_config
from flexmoe.data import collate
from flexmoe.methods.base import TrainHooks
from flexmoe.train import cosine_lr, local_train, response_loss
from flexmoe.train.loop import num_local_steps

from helpers.tiny import tiny_model


def features(n: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 96, (6 + i,), generator=generator).tolist()
        prompt = 3 + i % 2
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def pad(batch):
    return collate(batch, 0)


def train_config(*overrides: str):
    return load_config(None, ["train.max_grad_norm=0", 'train.precision="fp32"', *overrides]).train


def head_params(model):
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    return {"lm_head.weight": model.lm_head.weight}


def test_response_loss_matches_transformers_mean_over_response_tokens():
    model = tiny_model("qwen2_moe")
    batch = pad(features())
    loss_sum, tokens = response_loss(model, batch)
    reference = model(**batch).loss  # transformers' causal-LM loss: mean over labels != -100
    assert tokens == sum(sum(1 for t in f["labels"][1:] if t != -100) for f in features())
    torch.testing.assert_close(loss_sum / tokens, reference, rtol=1e-5, atol=1e-6)


def sgd_step(*overrides: str, hooks: TrainHooks = TrainHooks(), feats=None) -> torch.Tensor:
    model = tiny_model("qwen2_moe")
    params = head_params(model)
    local_train(model, params, feats or features(), pad, train_config("train.optimizer=\"sgd\"",
                "train.lr=0.1", "train.local_steps=1", *overrides), lr=0.1, seed=0, hooks=hooks)
    return params["lm_head.weight"].detach().clone()


def test_gradient_accumulation_equals_one_big_batch():
    big = sgd_step("train.batch_size=4")
    accumulated = sgd_step("train.batch_size=2", "train.grad_accum=2")
    torch.testing.assert_close(big, accumulated, rtol=1e-5, atol=1e-6)


def test_scaffold_correction_shifts_the_sgd_step_by_lr_times_correction():
    plain = sgd_step("train.batch_size=4")
    correction = torch.full_like(plain, 0.3)
    corrected = sgd_step("train.batch_size=4", hooks=TrainHooks(grad_correction={"lm_head.weight": correction}))
    torch.testing.assert_close(corrected, plain - 0.1 * 0.3, rtol=0, atol=1e-6)


def test_fedprox_adds_mu_times_distance_to_the_gradient():
    plain = sgd_step("train.batch_size=4")
    start = tiny_model("qwen2_moe").lm_head.weight.detach()
    anchor = {"lm_head.weight": start - 1.0}  # w - anchor = 1 everywhere at the first step
    prox = sgd_step("train.batch_size=4", hooks=TrainHooks(proximal_mu=0.5, proximal_anchor=anchor))
    torch.testing.assert_close(prox, plain - 0.1 * 0.5, rtol=0, atol=1e-6)
    zero = sgd_step("train.batch_size=4", hooks=TrainHooks(proximal_mu=0.0, proximal_anchor=anchor))
    assert torch.equal(zero, plain)


def test_clipping_bounds_the_gradient_norm():
    start = tiny_model("qwen2_moe").lm_head.weight.detach()
    clipped = sgd_step("train.batch_size=4", "train.max_grad_norm=1e-3")
    assert torch.linalg.vector_norm(clipped - start).item() == pytest.approx(0.1 * 1e-3, rel=1e-3)


def test_optimizer_state_carries_over_between_calls():
    feats = features()
    config = train_config("train.batch_size=4", "train.local_steps=1")

    def run(steps_per_call: list[int]):
        model = tiny_model("qwen2_moe")
        params = head_params(model)
        state = None
        for steps in steps_per_call:
            cfg = config.model_copy(update={"local_steps": steps})
            state = local_train(model, params, feats, pad, cfg, lr=0.01, seed=0, optimizer_state=state).optimizer_state
        return params["lm_head.weight"].detach(), state

    once, state = run([2])
    twice, _ = run([1, 1])
    torch.testing.assert_close(once, twice, rtol=1e-5, atol=1e-7)  # batch = whole set: same data each step
    assert state["lm_head.weight::step"].item() == 2 and "lm_head.weight::exp_avg_sq" in state


def test_same_seed_same_training_and_loss_falls():
    model = tiny_model("qwen2_moe")
    params = head_params(model)
    result = local_train(model, params, features(8), pad, train_config("train.local_steps=10", "train.batch_size=8"),
                         lr=0.05, seed=1)
    first = response_loss(tiny_model("qwen2_moe"), pad(features(8)))
    assert result.loss < first[0].item() / first[1]
    assert result.steps == 10 and result.tokens == 10 * first[1]
    again = tiny_model("qwen2_moe")
    local_train(again, head_params(again), features(8), pad, train_config("train.local_steps=10", "train.batch_size=8"),
                lr=0.05, seed=1)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_bf16_autocast_trains_close_to_fp32():
    fp32 = sgd_step("train.batch_size=4")
    bf16 = sgd_step("train.batch_size=4", 'train.precision="bf16"')
    start = tiny_model("qwen2_moe").lm_head.weight.detach()
    assert not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16 - start, fp32 - start, rtol=0.05, atol=2e-3)


def test_cosine_schedule_over_rounds():
    config = train_config("train.lr=0.1", "train.min_lr_ratio=0.1")
    assert cosine_lr(config, 1, 5) == pytest.approx(0.1)
    assert cosine_lr(config, 3, 5) == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi / 2)))
    assert cosine_lr(config, 5, 5) == pytest.approx(0.01)
    assert cosine_lr(train_config("train.schedule=\"constant\"", "train.lr=0.02"), 4, 5) == 0.02


def test_local_epochs_replace_local_steps():
    assert num_local_steps(train_config("train.local_steps=7"), 100) == 7
    assert num_local_steps(train_config("train.local_epochs=2", "train.batch_size=8", "train.grad_accum=2"), 100) == 13
