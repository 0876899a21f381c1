"""The pretraining model and one optimiser step: the architecture, the learning-rate schedule,
the optimiser, the device, and the step's losses (LM, load balancing, router z-loss, router
supervision)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.models.device import resolve_device
from flexmoe.pretrain.config import ModelSettings, TrainSettings


def supervision_weight(step: int, settings: TrainSettings) -> float:
    """router_supervision_coef, falling linearly to 0 at router_supervision_until of the steps."""
    end = settings.router_supervision_until * settings.steps
    return settings.router_supervision_coef * max(0.0, 1.0 - step / end)


def router_supervision_loss(router_logits, targets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mean over layers of the cross-entropy between each token's router and its row's expert."""
    token_targets = targets.repeat_interleave(seq_len)
    return torch.stack([torch.nn.functional.cross_entropy(logits.float(), token_targets.to(logits.device),
                                                          ignore_index=-1)
                        for logits in router_logits]).mean()


def build_model(settings: ModelSettings, tokenizer, seed: int):
    """A qwen2_moe causal LM: every layer sparse, gated shared expert, tied embeddings; freshly
    initialised, or the float32 weights of `settings.init_from`."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    if settings.init_from:
        return _continued_model(settings)

    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.shared_expert_intermediate_size,  # unused: no dense layer
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=settings.max_position_embeddings,
        num_experts=settings.num_experts,
        num_experts_per_tok=settings.num_experts_per_tok,
        moe_intermediate_size=settings.moe_intermediate_size,
        shared_expert_intermediate_size=settings.shared_expert_intermediate_size,
        norm_topk_prob=settings.norm_topk_prob,
        router_aux_loss_coef=settings.router_aux_loss_coef,
        initializer_range=settings.initializer_range,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=True,
        qkv_bias=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(config)


def _continued_model(settings: ModelSettings):
    from transformers import Qwen2MoeForCausalLM

    path = init_dir(settings)
    model = Qwen2MoeForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    for key, value in settings.model_dump().items():
        if key != "init_from" and getattr(model.config, key, value) != value:
            raise FlexmoeError(f"model.init_from: {path} has {key} = {getattr(model.config, key)!r}, "
                               f"the config says {value!r}")
    model.config.router_aux_loss_coef = settings.router_aux_loss_coef
    return model


def init_dir(settings: ModelSettings) -> Path:
    path = Path(settings.init_from)
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise FlexmoeError(f"model.init_from: no model directory at {path} (config.json or tokenizer.json missing)")
    return path


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and expert tensors only, not on norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "embed" not in name else no_decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(settings.beta1, settings.beta2))


def training_device(name: str) -> torch.device:
    """The torch device for `train.device`, resolved as a run's `runtime.device` is (`resolve_device`)."""
    device = resolve_device(name, key="train.device")
    if device.type == "cuda":
        # float32 matmuls as TF32: transformers runs the fused experts in the weights' dtype (float32
        # master weights), outside autocast
        torch.set_float32_matmul_precision("high")
    return device


def router_z_loss(router_logits) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022): mean over layers and tokens of logsumexp(logits)²."""
    return torch.stack([torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in router_logits]).mean()


def train_step(model, optimizer, batch: torch.Tensor, step: int, settings: TrainSettings,
               targets: torch.Tensor | None = None) -> dict:
    """One optimiser step on LM loss + router load-balancing loss (+ z-loss, + router supervision
    toward `targets`, one expert per row); returns the step's metrics."""
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * lr_factor(step, settings)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
        out = model(input_ids=batch.to(device), labels=batch.to(device), output_router_logits=True)
    loss = out.loss  # transformers already added router_aux_loss_coef * aux_loss
    metrics = {}
    if settings.router_z_loss_coef:
        z_loss = router_z_loss(out.router_logits)
        loss = loss + settings.router_z_loss_coef * z_loss
        metrics["z_loss"] = float(z_loss.detach())
    weight = supervision_weight(step, settings) if targets is not None else 0.0
    if weight:
        supervision = router_supervision_loss(out.router_logits, targets, batch.shape[1])
        loss = loss + weight * supervision
        metrics.update(supervision_loss=float(supervision.detach()), supervision_weight=weight)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    aux = float(out.aux_loss.detach())
    return {"loss": float(out.loss.detach()) - model.config.router_aux_loss_coef * aux, "aux_loss": aux,
            **metrics, "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"]}
