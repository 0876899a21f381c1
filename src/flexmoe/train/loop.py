"""One local training loop for all methods.

AdamW (or SGD) over the trainable parameters, a learning rate fixed within a round and
decayed by a cosine over rounds, gradient accumulation, clipping, and a loss on response
tokens only (prompt tokens carry label IGNORE_INDEX). Method terms enter through `TrainHooks`:
FedProx's proximal gradient is part of the objective (added before clipping); SCAFFOLD's
correction is part of the update rule (added after clipping, as in its Algorithm 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.config import TrainConfig
from flexmoe.data.tokens import IGNORE_INDEX
from flexmoe.heap import release_freed_memory
from flexmoe.methods.base import TrainHooks
from flexmoe.models.device import autocast, compute_dtype, model_device
from flexmoe.models.families import unwrap
from flexmoe.models.routing import ExpertCounts
from flexmoe.tensors import Tensors


StepCallback = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean response-token loss over the round
    steps: int
    tokens: int  # response tokens trained on
    optimizer_state: Tensors
    expert_counts: Tensors = dataclasses.field(default_factory=dict)  # see `count_experts`


def cosine_lr(config: TrainConfig, round_index: int, rounds: int) -> float:
    """Learning rate of round `round_index` (1-based): cosine from lr down to lr * min_lr_ratio."""
    if config.schedule == "constant" or rounds == 1:
        return config.lr
    floor = config.lr * config.min_lr_ratio
    progress = (round_index - 1) / (rounds - 1)
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def personal_lr(config: TrainConfig, round_index: int, rounds: int) -> float:
    """Learning rate of the personal parameters in round `round_index`: `personal_lr` (0: `lr`) on lr's schedule."""
    if not config.personal_lr:
        return cosine_lr(config, round_index, rounds)
    return cosine_lr(config.model_copy(update={"lr": config.personal_lr}), round_index, rounds)


def num_local_steps(config: TrainConfig, num_examples: int) -> int:
    if config.local_epochs > 0:
        per_step = config.batch_size * config.grad_accum
        return max(1, math.ceil(config.local_epochs * num_examples / per_step))
    return config.local_steps


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL over response tokens, number of those tokens).

    Only the positions that predict a response token go through the LM head: prompts are masked
    out, so that is ~10% of the positions of the builtin data, and the vocabulary-sized logits
    (head matmul, log-softmax, their gradients and copies) were the largest cost of a step."""
    device = model_device(model)
    batch = {key: value.to(device) for key, value in batch.items()}
    targets = batch["labels"][:, 1:]
    predicts = targets != IGNORE_INDEX
    with _head_rows(model, predicts):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits.float(), targets[predicts], reduction="sum")
    return loss, int(predicts.sum())


@contextlib.contextmanager
def _head_rows(model: nn.Module, rows: torch.Tensor):
    """The output head sees only the hidden states at `rows` (a (B, T-1) mask over positions
    0..T-2) and returns (rows, vocab) logits. What a model applies after its head (granitemoe's
    logit scaling) is elementwise, so it still applies."""
    head = unwrap(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, :-1][rows], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def local_train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    features: list[dict],
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    config: TrainConfig,
    lr: float,
    seed: int,
    hooks: TrainHooks = TrainHooks(),
    optimizer_state: Tensors | None = None,
    on_step: StepCallback | None = None,
    count_experts: set[str] = frozenset(),
    other_lr: dict[str, float] | None = None,
) -> TrainResult:
    """Train `params` (name -> parameter) in place on `features`; deterministic given `seed`.
    `count_experts`: MoE layers (name prefixes of their expert tensors) whose per-expert token
    counts over this training the result reports (`flexmoe.models.routing.ExpertCounts`).
    `other_lr`: {name: learning rate} of the parameters trained at a rate other than `lr` (the
    personal ones at `train.personal_lr`)."""
    if not features:
        raise ValueError("local_train needs at least one training example")
    optimizer = _make_optimizer(params, config, lr, other_lr or {})
    if optimizer_state:
        _load_optimizer_state(optimizer, params, optimizer_state)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    batches = _batch_stream(features, config.batch_size, generator)
    steps = num_local_steps(config, len(features))
    model.train()
    total_loss, total_tokens = 0.0, 0
    device = model_device(model)
    counting = ExpertCounts(model, set(count_experts))
    dtype = compute_dtype(model, config.precision)
    # fp16 gradients can underflow: scale the loss (a no-op scaler for fp32 and bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    with (_fp32_attention(model) if dtype != torch.float32 and device.type == "cpu" else contextlib.nullcontext(),
          activation_checkpointing(model, config.gradient_checkpointing), counting):
        for step in range(1, steps + 1):
            micro_batches = [collate(next(batches)) for _ in range(config.grad_accum)]
            with autocast(model, config.precision):
                loss_sum, tokens = _accumulate(model, micro_batches, scaler)
            scaler.unscale_(optimizer)
            _apply_hooks(params, hooks, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            total_loss += loss_sum
            total_tokens += tokens
            if on_step is not None:
                on_step(step, steps, loss_sum / max(tokens, 1))
    model.eval()
    release_freed_memory()  # the round's activations: freed, but glibc would keep them resident
    return TrainResult(
        loss=total_loss / max(total_tokens, 1),
        steps=steps,
        tokens=total_tokens,
        optimizer_state=_dump_optimizer_state(optimizer, params),
        expert_counts=counting.counts,
    )


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention computed in fp32 even inside bf16 autocast."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


FP32_SDPA = "flexmoe_sdpa_fp32"


@contextlib.contextmanager
def _fp32_attention(model: nn.Module):
    """Under bf16 autocast, run sdpa attention in fp32: on this CPU the bf16 flash-attention
    backward ran 2.5x slower than the fp32 one, and the whole bf16 step 13% slower (measured,
    benchmarks/results/fastpaths-*.md); fp32 attention is also the more exact. Other attention
    implementations are left as they are."""
    from transformers import AttentionInterface

    base = unwrap(model)
    previous = base.config._attn_implementation
    if previous != "sdpa":
        yield
        return
    AttentionInterface.register(FP32_SDPA, _sdpa_in_fp32)
    base.set_attn_implementation(FP32_SDPA)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool):
    """transformers' activation checkpointing of the decoder layers for the round (its default,
    non-reentrant: it needs no input that requires grad, which a frozen embedding does not give)."""
    if not enabled:
        yield
        return
    base = unwrap(model)
    base.activation_checkpointing_enable()
    try:
        yield
    finally:
        base.activation_checkpointing_disable()


def _accumulate(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                scaler: torch.amp.GradScaler | None = None) -> tuple[float, int]:
    """Backward over the micro-batches, normalised by the response tokens of all of them."""
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    loss_sum = 0.0
    for batch in micro_batches:
        loss, _ = response_loss(model, batch)
        scaled = loss / max(tokens, 1)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += float(loss.detach())
    return loss_sum, tokens


def _apply_hooks(params: dict[str, nn.Parameter], hooks: TrainHooks, max_grad_norm: float) -> None:
    for name, anchor in hooks.proximal_anchor.items():
        if hooks.proximal_mu > 0:
            param = params[name]
            param.grad = _grad_or_zero(param) + hooks.proximal_mu * (param.detach() - anchor.to(param.device, param.dtype))
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
    for name, correction in hooks.grad_correction.items():
        param = params[name]
        param.grad = _grad_or_zero(param) + correction.to(param.device, param.dtype)


def _grad_or_zero(param: nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


def _batch_stream(features: list[dict], batch_size: int, generator: torch.Generator):
    """Endless batches: a fresh seeded permutation per pass over the data."""
    while True:
        order = torch.randperm(len(features), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [features[i] for i in order[start : start + batch_size]]


def carried_optimizer_state(state: Tensors, shared: set[str], policy: str) -> Tensors:
    """The optimiser state a client starts its round with (`train.optimizer_state`): "keep" all of
    it, "reset-shared" drop the moments of the shared weights (which the aggregate replaced since
    they were computed: the common practice) and keep the personal ones, or "reset" everything."""
    if policy == "keep":
        return state
    if policy == "reset":
        return {}
    return {key: value for key, value in state.items() if key.split("::", 1)[0] not in shared}


def _make_optimizer(params: dict[str, nn.Parameter], config: TrainConfig, lr: float,
                    own_lr: dict[str, float]) -> torch.optim.Optimizer:
    """One parameter group at `lr`, and one per other learning rate in `own_lr` ({name: lr})."""
    by_lr: dict[float, list[nn.Parameter]] = {lr: []}
    for name, param in params.items():
        by_lr.setdefault(own_lr.get(name, lr), []).append(param)
    groups = [{"params": values, "lr": rate} for rate, values in by_lr.items() if values]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


def _dump_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> Tensors:
    """Optimizer state keyed by parameter name ("<param>::<slot>"), ready for safetensors."""
    out = {}
    for name, param in params.items():
        for slot, value in optimizer.state.get(param, {}).items():
            out[f"{name}::{slot}"] = torch.as_tensor(value).detach().clone()
    return out


def _load_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], state: Tensors) -> None:
    for name, param in params.items():
        # moments go to the parameter's device; AdamW keeps its scalar step count on the CPU
        slots = {key.split("::", 1)[1]: value.to(param.device if value.dim() else "cpu", copy=True)
                 for key, value in state.items() if key.split("::", 1)[0] == name}
        if slots:
            optimizer.state[param] = slots
