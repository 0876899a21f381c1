"""The model every process of a run builds the same way (server, each client, a restored run),
and the torch thread count it runs with."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from flexmoe.config import RunConfig
from flexmoe.errors import FlexmoeError
from flexmoe.methods.base import Method
from flexmoe.models import load_base
from flexmoe.models.device import placement
from flexmoe.models.roles import apply_roles, split_parameters


def load_model(config: RunConfig, method: Method) -> tuple[nn.Module, object]:
    """The base with the method's trainable shared part and its roles, seeded so every process
    builds the same."""
    model, tokenizer = load_base(config.model, **placement(config.runtime))  # runtime.device, runtime.base_dtype
    torch.manual_seed(config.seed)  # LoRA initialisation: identical on every client
    if config.runtime.quantize == "nf4":
        _check_frozen_experts(method, config.method)
    model = method.prepare_model(model)
    apply_roles(model, method.roles)
    model.eval()
    return model, tokenizer


def _check_frozen_experts(method: Method, name: str) -> None:
    """A 4-bit expert is dequantised on access and cannot train (PEFT's `target_parameters` would
    silently match nothing): nf4 is for methods that keep the experts frozen."""
    roles = (*method.roles.shared, *method.roles.personal)
    if getattr(method, "scope", "attention") != "attention" or "expert_lora" in roles:
        raise FlexmoeError(f"runtime.quantize = 'nf4' quantises the frozen experts, but method {name!r} trains "
                           "them; use lora.scope=attention, a method that keeps them frozen, or runtime.quantize=none")


def shared_params(model: nn.Module, method: Method) -> dict[str, nn.Parameter]:
    return split_parameters(model, method.roles).shared


def use_threads(config: RunConfig) -> int:
    """Set `runtime.threads` torch intra-op threads (0: keep torch's default); returns the previous count."""
    previous = torch.get_num_threads()
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    return previous


@contextlib.contextmanager
def torch_threads(config: RunConfig):
    """`use_threads` for the block, the previous count restored after it."""
    previous = use_threads(config)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
