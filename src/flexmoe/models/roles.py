"""Parameter roles: which of a model's parameters are shared (trained, sent to the server and
aggregated), personal (trained, kept on the client: never sent) and frozen.

A method declares its roles once, as a `Roles` value naming parts of the model (`PARTS`); the
engines, the wire, the personal-state store, the byte accounting and the privacy checks all read
the `ModelSplit` it yields, and `apply_roles` is the one place that sets `requires_grad` from it.
Parts are found by structure (PEFT's LoRA tensors, the family's routers, the graft modules), never
by what `requires_grad` happens to say.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from flexmoe.errors import FlexmoeError
from flexmoe.models.families import moe_layers
from flexmoe.models.graft import FROZEN_COPY, GRAFT, grafts_disabled

EXPERTS = ".experts."  # fused routed experts (and PEFT's wrappers of them); "shared_experts." does not match


def _is_lora(name: str) -> bool:
    """PEFT LoRA outside a graft (a LoRA-mode graft's own LoRA is part of the graft)."""
    return (".lora_A." in name or ".lora_B." in name) and not _in_graft(name)


def _in_graft(name: str) -> bool:
    return GRAFT in name.split(".")


def _is_graft(name: str) -> bool:
    """What of a graft trains: all of it, but a LoRA-mode graft's frozen copy."""
    return _in_graft(name) and FROZEN_COPY not in name


def _router_ids(model: nn.Module) -> set[int]:
    return {id(p) for layer in moe_layers(model) for p in layer.router.parameters()}


def _parts(model: nn.Module) -> dict[str, Callable[[str, nn.Parameter], bool]]:
    routers = _router_ids(model)
    return {
        "attention_lora": lambda n, p: _is_lora(n) and EXPERTS not in n,
        "expert_lora": lambda n, p: _is_lora(n) and EXPERTS in n,
        "routers": lambda n, p: id(p) in routers,
        "graft": lambda n, p: _is_graft(n),
        "base": lambda n, p: not _is_lora(n) and not _in_graft(n),  # every pretrained parameter (full fine-tuning)
    }


PARTS = ("attention_lora", "expert_lora", "routers", "graft", "base")


@dataclasses.dataclass(frozen=True)
class Roles:
    """The parts of the model each role holds (names from `PARTS`); every other parameter is frozen.
    A parameter in a shared part is shared even when a personal part also names it."""

    shared: tuple[str, ...]
    personal: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [p for p in (*self.shared, *self.personal) if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown model part {unknown[0]!r}; parts: {', '.join(PARTS)}")


@dataclasses.dataclass
class ModelSplit:
    """A model's named parameters by role; `order`: every name, in the model's own order."""

    shared: dict[str, nn.Parameter] = dataclasses.field(default_factory=dict)
    personal: dict[str, nn.Parameter] = dataclasses.field(default_factory=dict)
    frozen: dict[str, nn.Parameter] = dataclasses.field(default_factory=dict)
    order: list[str] = dataclasses.field(default_factory=list)

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        """What local training updates: the shared and the personal parameters, in model order."""
        keep = {**self.shared, **self.personal}
        return {name: keep[name] for name in self.order if name in keep}

    def numel(self, role: str) -> int:
        return sum(p.numel() for p in getattr(self, role).values())


def split_parameters(model: nn.Module, roles: Roles) -> ModelSplit:
    """The model's parameters by role (names as `model.named_parameters()` spells them)."""
    parts = _parts(model)
    split = ModelSplit()
    for name, param in model.named_parameters():
        split.order.append(name)
        if any(parts[part](name, param) for part in roles.shared):
            split.shared[name] = param
        elif any(parts[part](name, param) for part in roles.personal):
            split.personal[name] = param
        else:
            split.frozen[name] = param
    return split


def apply_roles(model: nn.Module, roles: Roles) -> ModelSplit:
    """Make exactly the shared and personal parameters trainable; returns the split. Trained
    routers of a half-precision base get fp32 master weights (LoRA and grafts are made in fp32)."""
    if "routers" in (*roles.shared, *roles.personal):
        from flexmoe.models.device import fp32_master

        for layer in moe_layers(model):
            fp32_master(layer.router)
    split = split_parameters(model, roles)
    for param in (*split.shared.values(), *split.personal.values()):
        param.requires_grad_(True)
    for param in split.frozen.values():
        param.requires_grad_(False)
    return split


def shared_state(model: nn.Module, roles: Roles) -> dict[str, torch.Tensor]:
    """Copies of the shared (sent) parameters."""
    return {name: param.detach().clone() for name, param in split_parameters(model, roles).shared.items()}


def set_shared_state(model: nn.Module, roles: Roles, state: dict[str, torch.Tensor]) -> None:
    """Copy received shared parameters into the model, in place; keys must match exactly."""
    copy_checked(split_parameters(model, roles).shared, state, "shared state", "this model")


def copy_checked(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str, owner: str) -> None:
    """Copy `state` into `targets` in place, refusing a missing or extra key or a shape mismatch."""
    missing, extra = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or extra:
        problem = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise FlexmoeError(f"{what} does not fit {owner}: {problem}")
    with torch.no_grad():
        for name, target in targets.items():
            if tuple(state[name].shape) != tuple(target.shape):
                raise FlexmoeError(f"{what} {name}: shape {tuple(state[name].shape)}, "
                                   f"{owner} has {tuple(target.shape)}")
            target.copy_(state[name])


def personal_outside_graft(model: nn.Module, roles: Roles) -> dict[str, nn.Parameter]:
    """The personal parameters outside a graft (FedPer's expert LoRA): the graft has its own file
    (`GRAFT_FILE`) and its own switch (`grafts_disabled`); these live in the client's state file."""
    return {name: p for name, p in split_parameters(model, roles).personal.items() if not _in_graft(name)}


@contextlib.contextmanager
def personal_disabled(model: nn.Module, roles: Roles):
    """The model without its personal part, for the block (the global model): grafts off, and the
    personal LoRA zeroed (a zero LoRA adds nothing), its values restored after."""
    held = personal_outside_graft(model, roles)
    if any(".lora_A." not in name and ".lora_B." not in name for name in held):
        raise ValueError("only LoRA personal parameters can be disabled by zeroing them")
    saved = {name: p.detach().clone() for name, p in held.items()}
    with torch.no_grad():
        for p in held.values():
            p.zero_()
    try:
        with grafts_disabled(model):
            yield
    finally:
        with torch.no_grad():
            for name, p in held.items():
                p.copy_(saved[name])
