"""LoRA (PEFT) on a chosen scope of the model: the trainable part methods share (which
parameters are shared, personal or frozen is `flexmoe.models.roles`).

Scopes:
- "attention": LoRA on the family's attention projections, named explicitly (FLEx). PEFT's
  "all-linear" or MLP names would silently put LoRA on the fused experts and the router.
- "attention+experts": also LoRA on the fused expert tensors via PEFT `target_parameters`.
- "full": full fine-tuning, no adapter: every base parameter is trainable (the graft, if any,
  stays as it is).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from flexmoe.errors import FlexmoeError
from flexmoe.models.families import Family, family_of, moe_layers, unwrap
from flexmoe.models.graft import GRAFT, grafts, set_trainable
from flexmoe.models.peft_quiet import peft_quietly

SCOPES = ("attention", "attention+experts", "full")


def attention_pattern(family: Family, names: tuple[str, ...] = ()) -> str:
    """Regex (PEFT `target_modules`) matching exactly the attention projections `names` (default: all of
    the family's) of every layer."""
    return rf".*\.self_attn\.({'|'.join(map(re.escape, names or family.attention))})"


def attention_targets(family: Family, names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` checked against the family's attention projections (empty: all of them)."""
    unknown = [name for name in names if name not in family.attention]
    if unknown:
        raise FlexmoeError(f"config key lora.attention: {unknown[0]!r} is not an attention projection of "
                           f"{family.model_type} (its projections: {', '.join(family.attention)})")
    return tuple(names) or family.attention


def expert_parameters(model: nn.Module) -> list[str]:
    """PEFT `target_parameters` for the fused experts of every MoE layer."""
    block = family_of(model).block
    return [f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"]


def add_lora(model: nn.Module, scope: str = "attention", r: int = 8, alpha: int = 16, dropout: float = 0.0,
             seed: int = 0, expert_r: int | None = None, attention: tuple[str, ...] = ()) -> nn.Module:
    """Make the shared part trainable: wrap with PEFT LoRA on `scope` (or unfreeze all, "full").

    Returns the PEFT model ("attention", "attention+experts") or the model itself ("full").
    A graft present before wrapping stays trainable. LoRA initialisation is seeded.
    `expert_r` ("attention+experts" only; default `r`) gives the fused experts' LoRA its own rank,
    with alpha scaled alike so that its scale alpha/r is the attention LoRA's. `attention`: the attention
    projections LoRA goes on (e.g. ("q_proj", "k_proj", "v_proj"), as the FLEx authors'); default all.
    """
    if scope not in SCOPES:
        raise FlexmoeError(f"unknown LoRA scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if hasattr(model, "peft_config"):
        raise FlexmoeError("the model already carries PEFT adapters; add_lora applies once")
    family = family_of(model)
    if scope == "full" and next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
        raise FlexmoeError(f"LoRA scope 'full' trains every base weight, which keeps fp32 master weights: "
                           f"it needs runtime.base_dtype=fp32 (the base is {next(model.parameters()).dtype})")
    if scope == "full":
        for name, param in model.named_parameters():
            if GRAFT not in name.split("."):
                param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    if expert_r is not None and (scope != "attention+experts" or expert_r < 1):
        raise FlexmoeError(f"expert_r={expert_r}: a separate expert LoRA rank needs scope 'attention+experts' "
                           "and a rank >= 1")
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
        target_modules=attention_pattern(family, attention_targets(family, attention)),
        target_parameters=expert_parameters(model) if scope == "attention+experts" else None,
        **_expert_rank(model, r, alpha, expert_r),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with peft_quietly():
            peft_model = get_peft_model(model, config)
    for module in grafts(peft_model).values():
        set_trainable(module)  # PEFT freezes everything it did not add
    check_lora_placement(peft_model, scope, attention)
    if expert_r is not None:
        _check_expert_rank(peft_model, expert_r)
    return peft_model


def _expert_rank(model: nn.Module, r: int, alpha: float, expert_r: int | None) -> dict:
    """PEFT's per-target rank and alpha for the fused experts. PEFT matches these keys against the
    targeted parameter's name (a module-name key such as "experts" would not change the rank)."""
    if expert_r is None or expert_r == r:
        return {}
    keys = [name.removeprefix(f"{family_of(model).block}.") for name in expert_parameters(model)]
    return {"rank_pattern": dict.fromkeys(keys, expert_r), "alpha_pattern": dict.fromkeys(keys, alpha * expert_r / r)}


def _check_expert_rank(model: nn.Module, expert_r: int) -> None:
    for layer in moe_layers(model):
        ranks = {module.r["default"] for module in _lora_wrappers(layer.block.experts)}
        if ranks != {expert_r}:
            raise FlexmoeError(f"expert LoRA of {layer.name} got rank {sorted(ranks)}, expected {expert_r}")


def _lora_wrappers(module: nn.Module) -> list[nn.Module]:
    """PEFT's nested ParamWrappers around a fused experts module, outermost first."""
    found = []
    while isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
        found.append(module)
        module = module.base_layer
    return found


def lora_module_names(model: nn.Module) -> list[str]:
    """Names (in the unwrapped model) of the modules carrying LoRA weights."""
    return [name for name, module in unwrap(model).named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and len(module.lora_A)]


def check_lora_placement(model: nn.Module, scope: str, attention_names: tuple[str, ...] = ()) -> None:
    """Assert that LoRA sits exactly where `scope` says: never on a router, a shared expert or a
    graft; on the fused experts only for "attention+experts"; on every attention projection named
    (`attention_names`; default all of the family's) and on no other."""
    family = family_of(model)
    attention = re.compile(attention_pattern(family, attention_names))
    layers = moe_layers(model)
    expert_names = {f"{layer.name}.experts" for layer in layers}
    placed = lora_module_names(model)
    for name in placed:
        on_experts = name in expert_names or _strip_base_layer(name) in expert_names
        if attention.fullmatch(name) or (scope == "attention+experts" and on_experts):
            continue
        raise FlexmoeError(f"LoRA landed on {name!r}, outside the {scope!r} scope")
    attention_modules = [name for name, _ in unwrap(model).named_modules() if attention.fullmatch(name)]
    if not attention_modules or not set(attention_modules) <= set(placed):
        raise FlexmoeError(f"LoRA missed attention projections of {type(unwrap(model)).__name__}")
    if scope == "attention+experts":
        covered = {_strip_base_layer(name) for name in placed}
        if not expert_names <= covered:
            raise FlexmoeError(f"LoRA missed the fused experts of {sorted(expert_names - covered)[0]}")
    elif getattr(model, "peft_config", None):
        targets = [getattr(c, "target_parameters", None) for c in model.peft_config.values()]
        if any(targets):
            raise FlexmoeError(f"LoRA scope {scope!r} must not target expert parameters, got {targets}")


def _strip_base_layer(name: str) -> str:
    # PEFT nests one ParamWrapper per targeted parameter: experts.base_layer.base_layer...
    return re.sub(r"(\.base_layer)+$", "", name)
